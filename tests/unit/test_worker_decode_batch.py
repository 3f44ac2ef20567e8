"""Continuous batching: requests admitted into a batch that is already decoding produce exactly what they
produce alone (greedy tokens equal, seeded samples equal, logprobs within 1e-4), rows of different adapters
mix, finished rows leave, and the token budget refuses oversized admissions."""

from __future__ import annotations

import pytest

from tests.unit.worker_fixtures import make_adapter, register, shared_model
from worker.sampler import DecodeBatch, SampleWork, run_sampling

LOGPROB_TOL = 1e-4  # float32 logits of different batch compositions differ by reassociation only


@pytest.fixture(scope="module")
def lm():
    return shared_model("smollm2")


@pytest.fixture(scope="module")
def slot(lm):
    return register(lm, make_adapter(lm, rank=4, seed=3, b_std=0.02))


def works(slot: int) -> list[SampleWork]:
    return [
        SampleWork(slot=None, prompt=[1, 504, 2677, 314], max_tokens=8, temperature=0.0),
        SampleWork(
            slot=slot, prompt=[1, 42, 43], max_tokens=5, temperature=1.0, seed=11, num_samples=2, top_logprobs=3
        ),
        SampleWork(slot=slot, prompt=[7, 8, 9, 10, 11, 12], max_tokens=6, temperature=0.0, prompt_logprobs=True),
    ]


def test_late_admission_matches_running_alone(lm, slot) -> None:
    alone = [run_sampling(lm, [w])[0] for w in works(slot)]
    batch = DecodeBatch(lm)
    first, *late = works(slot)
    outputs = batch.admit([first], ["a"])
    rows = {"a": [], "b": [], "c": []}
    for _ in range(3):
        for row in batch.step()[1]:
            rows[row.tag].append(row)
    outputs += batch.admit(late, ["b", "c"])
    assert len(batch) == 1 + 2 + 1
    while len(batch):
        for row in batch.step()[1]:
            rows[row.tag].append(row)
    for tag, ref in zip("abc", alone):
        got = [r.sequence() for r in sorted(rows[tag], key=lambda r: r.index)]
        assert [s.tokens for s in got] == [s.tokens for s in ref.sequences]
        for s, r in zip(got, ref.sequences):
            assert s.logprobs == pytest.approx(r.logprobs, abs=LOGPROB_TOL)
            assert s.stop_reason == r.stop_reason
    assert outputs[2].prompt_logprobs[1:] == pytest.approx(alone[2].prompt_logprobs[1:], abs=LOGPROB_TOL)
    top = rows["b"][0].sequence().top_logprobs
    assert len(top) == len(rows["b"][0].tokens) and all(len(t) == 3 for t in top)
    assert all(t[0][1] >= t[1][1] >= t[2][1] for t in top)


def test_token_budget_refuses_oversized_groups(lm, slot) -> None:
    batch = DecodeBatch(lm, token_budget=64)
    small = SampleWork(slot=None, prompt=[1, 2, 3], max_tokens=4)
    assert batch.fits([small])
    batch.admit([small], ["x"])
    assert not batch.fits([SampleWork(slot=None, prompt=list(range(1, 40)), max_tokens=40, num_samples=2)])
    while len(batch):
        batch.step()
    assert batch.cache is None and batch.width == 0


def test_prefix_cache_reuses_a_tenants_prompt_states_exactly(lm, slot) -> None:
    system = [1, 504, 2677, 314, 260, 1345, 28, 330]
    first = SampleWork(slot=slot, prompt=system + [42, 43], max_tokens=6, temperature=0.0, cache_key=("alice", slot))
    follow = SampleWork(
        slot=slot, prompt=system + [42, 43, 44, 45, 46], max_tokens=6, temperature=0.0, cache_key=("alice", slot)
    )
    uncached = run_sampling(lm, [SampleWork(slot=slot, prompt=follow.prompt, max_tokens=6, temperature=0.0)])[0]

    batch = DecodeBatch(lm)
    batch.admit([first], ["first"])
    while len(batch):
        batch.step()
    out = batch.admit([follow], ["follow"])[0]
    assert out.cache_hit_tokens == len(first.prompt)
    rows = []
    while len(batch):
        rows += batch.step()[1]
    assert rows[0].tokens == uncached.sequences[0].tokens
    assert rows[0].logprobs == pytest.approx(uncached.sequences[0].logprobs, abs=LOGPROB_TOL)

    # Another tenant (or other weights) never hits alice's entries.
    for key in (("bob", slot), ("alice", None)):
        other = SampleWork(slot=slot, prompt=follow.prompt + [47], max_tokens=2, temperature=0.0, cache_key=key)
        assert batch.admit([other], ["x"])[0].cache_hit_tokens == 0
        while len(batch):
            batch.step()
