"""Faults in a scaled-out Loom (Celery on a private Redis, PostgreSQL, API + `loom worker` processes), driven by
the official tinker SDK. Each test's pass criterion: 0 requests lost, 0 applied twice, and the final adapter
weights equal a fault-free run of the same requests (same seed) within 1e-6.

- A worker SIGKILLed while it holds the lease of a forward_backward (stopped first, at a moment it holds leases,
  so the kill lands mid-step however fast the step is): the reaper releases it after
  `DEAD_AFTER`, the run moves to the other worker, which rebuilds it from the op log and retries the request.
  Run twice: rebuilt by replaying every op (no recovery checkpoints yet), and with `LOOM_RECOVERY_EVERY=1`,
  rebuilt from the newest hidden recovery checkpoint (only that one is kept, older ones' files are deleted).
- A request that kills every worker that runs it (a poison request): after 3 lost workers it fails with a
  clear server error; the run's later requests and other runs go on.
- Redis killed with -9 while 100 requests are queued (their wake-up messages are lost), then restarted:
  every request completes exactly once.
- Redis killed with -9 while an OpenAI stream is open (the worker paused, so the rest of its token events and
  its finish signal are lost): the stream still ends, with the whole answer.
- A step that outlives the Celery visibility timeout and its own lease period: the heartbeat renews the lease,
  so the request runs once (attempt 1).
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import openai
import pytest
import tinker
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from api.db.models import Checkpoint, Job
from tests.integration.scaleout import (
    ADAM,
    TINY,
    Cluster,
    datum,
    running_cluster,
    train,
    training_client,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ATOL = 1e-6


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch, request):
    with running_cluster(tmp_path, postgres_url, **getattr(request, "param", {})) as cluster:
        monkeypatch.setenv("TINKER_BASE_URL", cluster.api.url)
        monkeypatch.setenv("TINKER_API_KEY", cluster.api.api_key)
        yield cluster


def saved_factors(cluster: Cluster, client, name: str) -> dict[str, torch.Tensor]:
    path = client.save_state(name).result().path
    return load_file(cluster.checkpoint_folder(path) / "adapter_model.safetensors")


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=0, msg=name)


def assert_each_applied_once(cluster: Cluster, model_id: str, retried: set[int] = frozenset()) -> None:
    """Every op done; leased once, or twice if it was leased by a killed worker (its result recorded once)."""
    for job in cluster.jobs(model_id):
        assert job.state == "done", f"{job.id}: {job.state} {job.error}"
        assert job.attempt == (2 if job.seq_id in retried else 1), f"{job.id} ran {job.attempt} times"


def leased_job(cluster: Cluster, model_id: str, kind: str, min_seq: int) -> Job | None:
    with cluster.sessions() as session:
        return session.scalar(
            select(Job).where(Job.model_id == model_id, Job.kind == kind, Job.state == "leased", Job.seq_id >= min_seq)
        )


def freeze_holding_leases(cluster: Cluster, model_id: str, min_seq: int) -> tuple[str, set[int]]:
    """Stop (SIGSTOP) the worker running one of the run's forward_backward ops from `min_seq` on, at a moment it
    still holds leases (a tick of the tiny model can end between seeing a lease and signalling its process); returns
    the worker and the seq_ids it holds, which cannot change while it is stopped."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = leased_job(cluster, model_id, "forward_backward", min_seq)
        if job is None:
            time.sleep(0.01)
            continue
        process = cluster.process_of(job.lease_owner)
        process.send_signal(signal.SIGSTOP)
        held = {j.seq_id for j in cluster.jobs(model_id) if j.state == "leased" and j.lease_owner == job.lease_owner}
        if held:
            return job.lease_owner, held
        process.send_signal(signal.SIGCONT)  # it finished them just before: catch a later tick
    raise TimeoutError(f"no worker was caught holding a lease of {model_id} from seq {min_seq} on")


@pytest.mark.parametrize(
    "cluster", [{}, {"LOOM_RECOVERY_EVERY": "1"}], ids=["replay", "recovery-checkpoint"], indirect=True
)
def test_sigkill_mid_step_moves_the_run_and_loses_nothing(cluster: Cluster) -> None:
    cluster.start_worker()
    cluster.start_worker()
    cluster.wait_for_workers(2)
    client = training_client()
    model_id = client.model_id
    train(client, steps=2)  # seq 1-4, recorded before the fault
    outcome: dict = {}
    trainer = threading.Thread(target=lambda: outcome.update(losses=train(client, steps=6)), daemon=True)
    trainer.start()
    victim, held = freeze_holding_leases(cluster, model_id, min_seq=9)
    cluster.process_of(victim).send_signal(signal.SIGKILL)
    cluster.process_of(victim).wait()
    retried = {j.seq_id for j in cluster.jobs(model_id) if j.state == "leased" and j.lease_owner == victim}
    assert retried == held and max(retried) >= 9  # what it held when killed (a chain reaching seq 9 or later)
    trainer.join(180)
    assert not trainer.is_alive() and "losses" in outcome
    survivor = cluster.placement(model_id)
    assert survivor is not None and survivor != victim
    assert_each_applied_once(cluster, model_id, retried)
    restored = re.findall(rf"restoring {re.escape(model_id)}: (\S+) \+ (\d+) op", cluster.logs())
    assert len(restored) == 1, cluster.logs()
    if cluster.env.get("LOOM_RECOVERY_EVERY") == "1":
        assert "/recovery/" in restored[0][0] and int(restored[0][1]) <= 2  # at most the step in flight
        assert_only_newest_recovery_checkpoint_kept(cluster, model_id)
    else:
        assert restored[0][0] == "log"
    faulted = saved_factors(cluster, client, "after-fault")

    reference = training_client()  # same seed, same requests, no fault
    train(reference, steps=2)
    assert outcome["losses"] == pytest.approx(train(reference, steps=6), rel=1e-5)
    assert_same_weights(faulted, saved_factors(cluster, reference, "fault-free"))


def assert_only_newest_recovery_checkpoint_kept(cluster: Cluster, model_id: str) -> None:
    last_optim = max(j.seq_id for j in cluster.jobs(model_id) if j.kind == "optim_step")
    with cluster.sessions() as session:
        rows = session.scalars(
            select(Checkpoint).where(Checkpoint.run_id == model_id, Checkpoint.checkpoint_id.startswith("recovery/"))
        ).all()
    assert [(r.checkpoint_id, r.ephemeral) for r in rows] == [(f"recovery/{last_optim}", True)]
    kept = Path(rows[0].storage_uri.removeprefix("file://"))
    # Superseded ones are deleted after commit (a write the SIGKILL cut short leaves staging, for `loom gc`).
    assert [p.name for p in kept.parent.iterdir() if not p.name.startswith(".staging-")] == [kept.name]


def test_a_request_that_kills_its_workers_fails_after_three(cluster: Cluster) -> None:
    for _ in range(4):
        cluster.start_worker()
    cluster.wait_for_workers(4)
    client = training_client()
    train(client, steps=1)
    poison = client.forward_backward([datum(100 + i, length=256) for i in range(2)], "cross_entropy")
    killed = set()
    deadline = time.monotonic() + 180
    while len(killed) < 3 and time.monotonic() < deadline:
        job = leased_job(cluster, client.model_id, "forward_backward", 3)
        if job is not None and job.lease_owner not in killed:
            cluster.process_of(job.lease_owner).send_signal(signal.SIGKILL)
            killed.add(job.lease_owner)
        time.sleep(0.01)
    assert len(killed) == 3
    with pytest.raises(tinker.TinkerError) as failure:
        poison.result()
    assert "lost 3 times" in str(failure.value)
    (job,) = [j for j in cluster.jobs(client.model_id) if j.seq_id == 3]
    assert (job.state, job.error_category, job.attempt) == ("failed", "server", 3)
    assert train(client, steps=1)[0] > 0  # the run goes on, rebuilt on the last worker standing
    other = training_client(seed=8)
    train(other, steps=2)
    assert_each_applied_once(cluster, other.model_id)


def test_redis_kill9_with_100_queued_requests_loses_none(cluster: Cluster) -> None:
    worker = cluster.start_worker()
    cluster.wait_for_workers(1)
    client = training_client()
    train(client, steps=1)
    worker.send_signal(signal.SIGSTOP)  # keep everything queued while Redis dies
    futures = []
    for step in range(50):
        futures.append(client.forward_backward([datum(step)], "cross_entropy"))
        futures.append(client.optim_step(ADAM))
    wait_until(lambda: sum(j.state == "queued" for j in cluster.jobs(client.model_id)) == 100, 60, "100 queued")
    cluster.redis.kill9()
    time.sleep(1.0)
    cluster.redis.start()
    worker.send_signal(signal.SIGCONT)
    for future in futures:
        future.result()
    assert_each_applied_once(cluster, client.model_id)
    faulted = saved_factors(cluster, client, "after-redis")

    reference = training_client()
    train(reference, steps=1)
    for step in range(50):
        reference.forward_backward([datum(step)], "cross_entropy")
        reference.optim_step(ADAM)
    assert_same_weights(faulted, saved_factors(cluster, reference, "fault-free"))


def test_redis_kill9_mid_stream_still_delivers_the_whole_answer(cluster: Cluster) -> None:
    worker = cluster.start_worker()
    cluster.wait_for_workers(1)
    client = openai.OpenAI(base_url=f"{cluster.api.url}/v1", api_key=cluster.api.api_key, max_retries=0)
    ask = {"model": TINY, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0.0}  # seconds of decoding
    chunks = []
    for chunk in client.completions.create(**ask, stream=True):
        chunks.append(chunk)
        if len(chunks) == 1:
            assert chunk.choices[0].finish_reason is None  # the worker is still decoding
            worker.send_signal(signal.SIGSTOP)
            cluster.redis.kill9()
            worker.send_signal(signal.SIGCONT)
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    cluster.redis.start()
    plain = client.completions.create(**ask).choices[0]
    assert streamed == plain.text and plain.finish_reason == "length"


@pytest.mark.parametrize("cluster", [{"LOOM_VISIBILITY_TIMEOUT": "1", "LOOM_LEASE_SECONDS": "1"}], indirect=True)
def test_a_step_longer_than_visibility_timeout_and_lease_runs_once(cluster: Cluster) -> None:
    cluster.start_worker()
    cluster.start_worker()
    cluster.wait_for_workers(2)
    client = training_client()
    fb = client.forward_backward([datum(i, length=256) for i in range(4)], "cross_entropy")
    client.optim_step(ADAM).result()
    assert fb.result().metrics["loss:sum"] > 0
    assert_each_applied_once(cluster, client.model_id)
    (step,) = [j for j in cluster.jobs(client.model_id) if j.kind == "forward_backward"]
    took = (step.finished_at - step.started_at).total_seconds()
    assert took > 1.0, f"the step took {took:.2f} s: too short to outlive the 1 s lease and visibility timeout"
