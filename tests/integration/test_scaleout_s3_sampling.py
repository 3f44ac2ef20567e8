"""A scaled-out Loom with checkpoints in S3 (moto_server) and separate training and sampling workers.

Checked, with the official tinker SDK:
- `save_weights_and_get_sampling_client` on the training worker, then `sample` runs on the sampling-only worker,
  which loads the adapter from S3 by checkpoint; the sampled tokens' logprobs equal the training worker's
  `forward` logprobs for the same sequence (atol 1e-4): two processes, one set of weights;
- the OpenAI endpoint streams a checkpoint's tokens from the sampling worker (events over Redis) and the stream
  reassembles to the non-streaming answer at temperature 0;
- after the training worker is SIGKILLed, a new training worker rebuilds the run from its committed S3
  checkpoint plus the ops after it, and the final weights equal a fault-free run of the same requests (1e-6).
"""

from __future__ import annotations

import secrets
import signal
from pathlib import Path

import openai
import pytest
from sqlalchemy import select
from tinker import types

from api.db.models import Checkpoint, Job
from tests.integration.scaleout import Cluster, running_cluster
from tests.integration.test_scaleout_faults import (
    assert_each_applied_once,
    assert_same_weights,
    datum,
    saved_factors,
    train,
    training_client,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOGPROB_ATOL = 1e-4


@pytest.fixture
def s3_cluster(tmp_path: Path, postgres_url: str, s3_env, s3, monkeypatch: pytest.MonkeyPatch):
    bucket = f"loom-scaleout-{secrets.token_hex(4)}"
    s3.create_bucket(Bucket=bucket)
    with running_cluster(tmp_path, postgres_url, LOOM_CHECKPOINT_URL=f"s3://{bucket}/ckpt") as cluster:
        monkeypatch.setenv("TINKER_BASE_URL", cluster.api.url)
        monkeypatch.setenv("TINKER_API_KEY", cluster.api.api_key)
        yield cluster


def test_sampling_worker_loads_from_s3_and_runs_survive_a_dead_trainer(s3_cluster: Cluster) -> None:
    cluster = s3_cluster
    trainer = cluster.start_worker("train")
    cluster.start_worker("sample")
    cluster.wait_for_workers(2)
    client = training_client()
    train(client, steps=2)
    sampler = client.save_weights_and_get_sampling_client("snap")
    prompt = datum(3).model_input
    result = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=1.0, seed=5)).result()
    sequence = result.sequences[0]
    roles = {worker.id: worker.role for worker in cluster.registered()}
    with cluster.sessions() as session:
        samplers = set(session.scalars(select(Job.lease_owner).where(Job.kind == "sample")))
    assert {roles[owner] for owner in samplers} == {"sample"}
    full = prompt.to_ints() + sequence.tokens
    check = client.forward(
        [types.Datum(model_input=types.ModelInput.from_ints(full[:-1]), loss_fn_inputs={"target_tokens": full[1:]})],
        "cross_entropy",
    ).result()
    trained = check.loss_fn_outputs[0]["logprobs"].tolist()[-len(sequence.tokens) :]
    assert trained == pytest.approx(sequence.logprobs, abs=LOGPROB_ATOL)

    path = client.save_weights_for_sampler("chat").result().path
    chat = openai.OpenAI(base_url=f"{cluster.api.url}/v1", api_key=cluster.api.api_key, max_retries=0)
    ask = {"model": path, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}
    plain = chat.chat.completions.create(**ask)
    chunks = list(chat.chat.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert len(chunks) > 3  # token by token, not one final chunk

    client.save_state("mid").result()
    train(client, steps=1)
    trainer.send_signal(signal.SIGKILL)
    cluster.start_worker("train")
    train(client, steps=1)  # runs on the new worker, rebuilt from s3://.../weights/mid + one replayed step
    assert_each_applied_once(cluster, client.model_id)
    faulted = saved_factors(cluster, client, "end")
    with cluster.sessions() as session:
        uris = session.scalars(select(Checkpoint.storage_uri).where(Checkpoint.run_id == client.model_id)).all()
    assert uris and all(uri.startswith("s3://") for uri in uris)
    assert "restoring" in cluster.logs() and "s3://" in cluster.logs()

    reference = training_client()  # the same requests, no fault
    train(reference, steps=2)
    reference.save_state("mid").result()
    train(reference, steps=1)
    train(reference, steps=1)
    assert_same_weights(faulted, saved_factors(cluster, reference, "end"))
