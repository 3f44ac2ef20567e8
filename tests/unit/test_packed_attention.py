"""worker/models/packed_attention.py: a packed row's sequences attend only to themselves, sequence by sequence.

On SmolLM2 (Llama, grouped-query attention) and the tiny Kimi K2 (DeepseekV3's MLA, whose values are narrower than
its queries), both loaded with `PACKED_ATTENTION` installed: three sequences (9, 4 and 13 tokens) packed into one
row with restarting position ids and their boundaries give each sequence's final hidden states as the sequence run
alone does (atol 1e-5), and every layer's attention ran one SDPA call per sequence on exactly its slice, with no
mask; without boundaries (what the sampler sends) the function is plain SDPA with the caller's mask.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.worker_fixtures import shared_model, token_ids
from worker.models import packed_attention
from worker.models.packed_attention import PACKED_ATTENTION, boundaries

LENGTHS = [9, 4, 13]


@pytest.mark.parametrize("model", ["smollm2", "tiny_kimi_k2"])
def test_a_packed_row_equals_its_sequences_run_alone(model, monkeypatch) -> None:
    lm = shared_model(model)
    assert lm.model.config._attn_implementation == PACKED_ATTENTION
    seqs = [token_ids(n, seed=40 + i) for i, n in enumerate(LENGTHS)]
    with torch.no_grad():
        alone = [lm.model.model(input_ids=torch.tensor([s]), use_cache=False).last_hidden_state[0] for s in seqs]
        calls = []
        plain = packed_attention.sdpa_attention_forward

        def counted(module, query, key, value, mask, *args, **kwargs):
            calls.append((query.shape[2], key.shape[2], mask is None))
            return plain(module, query, key, value, mask, *args, **kwargs)

        monkeypatch.setattr(packed_attention, "sdpa_attention_forward", counted)
        packed = lm.model.model(
            input_ids=torch.tensor([[t for s in seqs for t in s]]),
            position_ids=torch.cat([torch.arange(n) for n in LENGTHS])[None],
            use_cache=False,
            **boundaries(LENGTHS, torch.device("cpu")),
        ).last_hidden_state[0]
    for got, want in zip(packed.split(LENGTHS), alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    layers = lm.model.config.num_hidden_layers
    assert calls == [(n, n, True) for _ in range(layers) for n in LENGTHS]


def test_without_boundaries_it_is_plain_sdpa() -> None:
    lm = shared_model("smollm2")
    ids = torch.tensor([token_ids(7, seed=1), token_ids(7, seed=2)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row, as the sampler batches prompts
    with torch.no_grad():
        got = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        lm.model.set_attn_implementation("sdpa")
        try:
            want = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            lm.model.set_attn_implementation(PACKED_ATTENTION)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
