"""worker.sampler.run_sampling (batched KV-cache decode, per-row adapters) against the trainer and a by-hand decode.

For SmolLM2 and tiny Kimi K2 with LoRA adapters whose B is random (so adapters really change the distribution):
- sampled-token logprobs (τ = 1) equal the trainer's logprobs of the same tokens through the same adapter, for
  rows of a left-padded batch mixing two adapters and the bare base model;
- prompt_logprobs equal the trainer's prompt logprobs; topk_prompt_logprobs are sorted, hold the argmax, and
  their values are the model's log-softmax;
- a seed makes sampling reproducible (also across batch compositions); different seeds differ;
- greedy decoding equals an argmax continuation computed by hand with full, uncached forwards;
- stop tokens / stop strings end a sequence with "stop" (the stop token / completing token kept), max_tokens
  with "length"; num_samples returns that many sequences; temperature scales the reported logprob.

Tolerance: logprobs atol 1e-4 (float32; cached left-padded decode vs unpadded full forward; measured ≲ 2e-5).
Tokens are compared exactly.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.worker_fixtures import make_adapter, ref_logits, register, shared_model, token_ids
from worker.sampler import SampleWork, _eos_ids, run_sampling
from worker.trainer import TrainDatum, WorkItem, run_forward_backward

LP_ATOL = 1e-4
GREEDY_STEPS = 8

B_STD = {"smollm2": 2e-3, "tiny_kimi_k2": 3e-3}


def _prompts(lm, key):
    if key == "smollm2":
        enc = lambda s: lm.tokenizer(s)["input_ids"]  # noqa: E731
        return enc("The capital of France is"), enc("1, 2, 3,"), enc("Once upon a time, in a small village, there")
    return token_ids(6, seed=11), token_ids(3, seed=12), token_ids(9, seed=13)


def _greedy_by_hand(lm, prompt, slot, eos):
    """Argmax continuation with an uncached full forward per step."""
    tokens, lps = [], []
    for _ in range(GREEDY_STEPS):
        logp = torch.log_softmax(ref_logits(lm, prompt + tokens, slot)[-1], -1)
        t = int(torch.argmax(logp))
        tokens.append(t)
        lps.append(float(logp[t]))
        if t in eos:
            break
    return tokens, lps


class Setup:
    def __init__(self, key: str) -> None:
        self.key = key
        self.lm = lm = shared_model(key)
        self.adapters = [
            make_adapter(lm, 4, 21, b_std=B_STD[key]),
            make_adapter(lm, 8, 22, unembed=False, b_std=B_STD[key]),
        ]
        self.slots = [register(lm, a) for a in self.adapters]
        self.eos = _eos_ids(lm)
        self.pa, self.pb, self.pc = _prompts(lm, key)
        s1, s2 = self.slots
        self.works = [
            SampleWork(s1, self.pa, num_samples=2, max_tokens=6, seed=1, prompt_logprobs=True, topk_prompt_logprobs=3),
            SampleWork(None, self.pb, max_tokens=5, seed=2, prompt_logprobs=True),
            SampleWork(s2, self.pc, max_tokens=4, seed=3),
        ]
        self.out = run_sampling(lm, self.works)
        self.greedy, self.greedy_lps = _greedy_by_hand(lm, self.pa, s1, self.eos)


@pytest.fixture(scope="module", params=["smollm2", "tiny_kimi_k2"])
def setup(request):
    s = Setup(request.param)
    yield s
    for slot in s.slots:
        s.lm.router.adapters.pop(slot, None)


def _trainer_logprobs(lm, slot, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i] | tokens[:i]) for i ≥ 1, from the trainer (forward-only cross_entropy)."""
    datum = TrainDatum(tokens[:-1], {"target_tokens": torch.tensor(tokens[1:])})
    if slot is None:
        return torch.log_softmax(ref_logits(lm, tokens[:-1], None), -1).gather(
            -1, datum.inputs["target_tokens"][:, None]
        )[:, 0]
    return run_forward_backward(lm, [WorkItem(slot, [datum], "cross_entropy", forward_only=True)])[0].logprobs[0]


def test_shapes_and_stop_reasons(setup):
    assert [len(o.sequences) for o in setup.out] == [2, 1, 1]
    for work, out in zip(setup.works, setup.out):
        for seq in out.sequences:
            assert 1 <= len(seq.tokens) <= work.max_tokens
            assert len(seq.logprobs) == len(seq.tokens)
            if seq.stop_reason == "length":
                assert len(seq.tokens) == work.max_tokens
            else:
                assert seq.stop_reason == "stop" and seq.tokens[-1] in setup.eos


def test_sampled_logprobs_equal_trainer_logprobs(setup):
    for work, out in zip(setup.works, setup.out):
        for seq in out.sequences:
            full = work.prompt + seq.tokens
            ref = _trainer_logprobs(setup.lm, work.slot, full)[len(work.prompt) - 1 :]
            torch.testing.assert_close(torch.tensor(seq.logprobs), ref, atol=LP_ATOL, rtol=0)


def test_adapter_changes_the_sampled_distribution(setup):
    """The checks above are not vacuous: the adapter's logprobs differ from the base model's."""
    work, seq = setup.works[0], setup.out[0].sequences[0]
    base = _trainer_logprobs(setup.lm, None, work.prompt + seq.tokens)[len(work.prompt) - 1 :]
    assert float((torch.tensor(seq.logprobs) - base).abs().max()) > 1e-2


def test_prompt_logprobs_equal_trainer_logprobs(setup):
    for work, out in zip(setup.works[:2], setup.out[:2]):
        assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(work.prompt)
        assert out.prompt_logprobs[0] is None
        ref = _trainer_logprobs(setup.lm, work.slot, work.prompt)
        torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), ref, atol=LP_ATOL, rtol=0)
    assert setup.out[2].prompt_logprobs is None and setup.out[2].topk_prompt_logprobs is None


def test_topk_prompt_logprobs_sorted_with_argmax(setup):
    work, out = setup.works[0], setup.out[0]
    top = out.topk_prompt_logprobs
    assert top is not None and len(top) == len(work.prompt) and top[0] is None
    logp = torch.log_softmax(ref_logits(setup.lm, work.prompt, work.slot), -1)
    for i in range(1, len(work.prompt)):
        entry = top[i]
        assert len(entry) == 3
        values = [v for _, v in entry]
        assert values == sorted(values, reverse=True)
        assert entry[0][0] == int(torch.argmax(logp[i - 1]))
        for tok, v in entry:
            assert v == pytest.approx(float(logp[i - 1, tok]), abs=LP_ATOL)


def test_seed_reproducible_and_batch_invariant(setup):
    lm, w = setup.lm, setup.works[0]
    again = run_sampling(lm, [SampleWork(w.slot, w.prompt, num_samples=2, max_tokens=6, seed=1)])[0]
    assert [s.tokens for s in again.sequences] == [s.tokens for s in setup.out[0].sequences]
    for a, b in zip(again.sequences, setup.out[0].sequences):
        assert a.logprobs == pytest.approx(b.logprobs, abs=LP_ATOL)
    others = run_sampling(lm, [SampleWork(w.slot, w.prompt, max_tokens=6, seed=s) for s in (101, 102, 103)])
    first = setup.out[0].sequences[0].tokens
    assert any(o.sequences[0].tokens != first for o in others), "different seeds all gave the same sample"


def test_num_samples(setup):
    w = setup.works[2]
    out = run_sampling(setup.lm, [SampleWork(w.slot, w.prompt, num_samples=3, max_tokens=3, seed=7)])[0]
    assert len(out.sequences) == 3
    assert all(1 <= len(s.tokens) <= 3 for s in out.sequences)
    if setup.key == "tiny_kimi_k2":  # near-uniform over 129k tokens: three draws from one generator differ
        assert len({tuple(s.tokens) for s in out.sequences}) == 3


def test_greedy_equals_argmax_by_hand(setup):
    w = setup.works[0]
    out = run_sampling(setup.lm, [SampleWork(w.slot, w.prompt, max_tokens=GREEDY_STEPS, temperature=0.0)])[0]
    seq = out.sequences[0]
    assert seq.tokens == setup.greedy
    assert seq.logprobs == pytest.approx(setup.greedy_lps, abs=LP_ATOL)
    assert seq.stop_reason == ("stop" if setup.greedy[-1] in setup.eos else "length")


def test_top_k_one_is_greedy(setup):
    w = setup.works[0]
    out = run_sampling(setup.lm, [SampleWork(w.slot, w.prompt, max_tokens=GREEDY_STEPS, top_k=1, seed=5)])[0]
    assert out.sequences[0].tokens == setup.greedy


def test_stop_token_ends_sequence(setup):
    greedy = setup.greedy
    k = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i])
    w = setup.works[0]
    out = run_sampling(
        setup.lm, [SampleWork(w.slot, w.prompt, max_tokens=GREEDY_STEPS, temperature=0.0, stop_tokens=[greedy[k]])]
    )[0]
    seq = out.sequences[0]
    assert seq.tokens == greedy[: k + 1]
    assert seq.stop_reason == "stop"


def test_stop_string_ends_sequence(setup):
    tok, greedy = setup.lm.tokenizer, setup.greedy
    stop = next(
        (tok.decode([t]).strip() for t in greedy[2:] if tok.decode([t]).strip() and "\ufffd" not in tok.decode([t])),
        None,
    )
    if stop is None:
        pytest.skip("greedy continuation has no printable token to use as a stop string")
    k = next(i for i in range(len(greedy)) if stop in tok.decode(greedy[: i + 1], skip_special_tokens=False))
    w = setup.works[0]
    out = run_sampling(
        setup.lm, [SampleWork(w.slot, w.prompt, max_tokens=GREEDY_STEPS, temperature=0.0, stop_strings=[stop])]
    )[0]
    seq = out.sequences[0]
    assert seq.tokens == greedy[: k + 1]
    assert seq.stop_reason == "stop"


def test_max_tokens_gives_length(setup):
    greedy = setup.greedy
    n = 3
    assert not set(greedy[:n]) & setup.eos
    w = setup.works[0]
    out = run_sampling(setup.lm, [SampleWork(w.slot, w.prompt, max_tokens=n, temperature=0.0)])[0]
    assert out.sequences[0].tokens == greedy[:n]
    assert out.sequences[0].stop_reason == "length"


def test_temperature_scales_reported_logprob(setup):
    w, tau = setup.works[2], 0.7
    out = run_sampling(setup.lm, [SampleWork(w.slot, w.prompt, max_tokens=1, temperature=tau, seed=9)])[0]
    t, lp = out.sequences[0].tokens[0], out.sequences[0].logprobs[0]
    z = ref_logits(setup.lm, w.prompt, w.slot)[-1]
    assert lp == pytest.approx(float(torch.log_softmax(z / tau, -1)[t]), abs=LP_ATOL)
    assert abs(lp - float(torch.log_softmax(z, -1)[t])) > 1e-3  # the τ = 1 value would be different
