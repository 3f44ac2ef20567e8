"""Checkpoint IO: PEFT-format export loads in stock `peft`, optimizer state resumes exactly, the store verifies.

- `save_adapter` output is loaded with `peft.PeftModel.from_pretrained(base, folder)` — stock peft over the plain
  transformers base as Loom's loader builds it (dequantised; none of our LoRA wrappers) — and its logits are compared
  with our
  server-side model routed through the same adapter. For tiny Kimi K2 this is done per target group (attention,
  dense MLP + shared experts, routed experts, unembedding: B zeroed elsewhere) so a layout error in any one group
  (e.g. the expert-major A / rank-major B stacking of routed experts) cannot hide behind the others.
  Tolerance: logits atol 1e-4 (float32, O(1..30) logits; measured ≤ 1e-6). Each check also requires the adapter
  to move our logits by > 1e-3 from the base model, so an adapter PEFT silently ignored would fail.
- `load_adapter` round-trips every factor bit-for-bit (torch.equal), in contiguous memory like fresh factors.
- `save_optimizer`/`load_optimizer` round trip: the next AdamW step of the resumed run equals the original's
  exactly (torch.equal), while a run resumed without optimizer state takes a different step.
- `LocalCheckpointStore.open` refuses flipped bytes, truncated / missing files and a missing manifest
  (`CheckpointCorrupt`), and `write` refuses to overwrite unless asked (`CheckpointExists`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from contract.checkpoint_store import MANIFEST, CheckpointCorrupt, CheckpointExists, LocalCheckpointStore
from loom.types import AdamParams
from tests.unit.worker_fixtures import ce_datum, make_adapter, ref_logits, register, shared_model, token_ids
from worker.checkpoint_io import (
    ADAPTER_WEIGHTS,
    CheckpointFormatError,
    load_adapter,
    load_optimizer,
    read_lora_spec,
    save_adapter,
    save_optimizer,
)
from worker.models.loader import load_weights
from worker.models.model_folder import check_model_folder
from worker.optimizer import RunOptimizer
from worker.trainer import WorkItem, run_forward_backward

LOGIT_ATOL = 1e-4
B_STD = {"smollm2": 2e-3, "tiny_kimi_k2": 3e-3}


def _peft_logits(lm, folder: Path, tokens: list[int]) -> torch.Tensor:
    # the base as Loom dequantises it (tiny Kimi K2 ships Kimi's fp8 blocks and `kimi_k2` model type, which plain
    # `AutoModelForCausalLM` would hand to remote code); what is checked is PEFT's reading of the adapter
    base = load_weights(check_model_folder(lm.path), torch.float32)
    model = PeftModel.from_pretrained(base, str(folder))
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()


def _group(name: str) -> str:
    if ".experts." in name:
        return "routed"
    if name.startswith("lm_head"):
        return "unembed"
    if ".mlp." in name:
        return "dense_mlp"
    return "attn"


def _keep_only(adapter, group: str | None):
    """Zero B of every target outside `group` (None keeps all)."""
    if group is None:
        return adapter
    with torch.no_grad():
        for name, (_, b) in adapter.params.items():
            if _group(name) != group:
                b.zero_()
    return adapter


CASES = [
    ("smollm2", None),
    ("tiny_kimi_k2", "attn"),
    ("tiny_kimi_k2", "dense_mlp"),  # the first dense layer's MLP and every MoE layer's shared experts
    ("tiny_kimi_k2", "routed"),
    ("tiny_kimi_k2", "unembed"),
]


@pytest.mark.parametrize(("key", "group"), CASES, ids=[f"{k}-{g or 'all'}" for k, g in CASES])
def test_peft_from_pretrained_matches_server_side_logits(tmp_path, key, group):
    lm = shared_model(key)
    adapter = _keep_only(make_adapter(lm, 4, 31, b_std=B_STD[key]), group)
    if group == "dense_mlp":
        assert any("shared_experts" in n for n in adapter.params) and any("layers.0.mlp" in n for n in adapter.params)
    slot = register(lm, adapter)
    try:
        save_adapter(tmp_path, adapter, lm.targets, str(lm.path))
        tokens = token_ids(10, seed=32)
        ours = ref_logits(lm, tokens, slot)
        base = ref_logits(lm, tokens, None)
        assert float((ours - base).abs().max()) > 1e-3, "adapter group has no effect; comparison would be vacuous"
        theirs = _peft_logits(lm, tmp_path, tokens)
        torch.testing.assert_close(theirs, ours, atol=LOGIT_ATOL, rtol=0)
    finally:
        lm.router.adapters.pop(slot, None)


@pytest.mark.parametrize("key", ["smollm2", "tiny_kimi_k2"])
def test_load_adapter_round_trip_is_exact(tmp_path, key):
    lm = shared_model(key)
    adapter = make_adapter(lm, 6, 33, attn=True, mlp=True, unembed=False, b_std=1e-2)
    save_adapter(tmp_path, adapter, lm.targets, str(lm.path))
    spec = read_lora_spec(tmp_path)  # from adapter_config.json (no trainer_state.json here)
    assert (spec.rank, spec.train_attn, spec.train_mlp, spec.train_unembed) == (6, True, True, False)
    loaded = load_adapter(tmp_path, lm.targets)
    assert loaded.params.keys() == adapter.params.keys()
    for name, (a, b) in adapter.params.items():
        la, lb = loaded.params[name]
        assert torch.equal(la, a) and torch.equal(lb, b), name
        # Laid out like fresh factors, so forward passes round identically (a strided view would not).
        assert la.is_contiguous() and lb.is_contiguous(), name
    if key == "tiny_kimi_k2":
        assert any(a.dim() == 3 for a, _ in loaded.params.values())  # routed experts round-trip as (E, r, in)


def test_load_adapter_rejects_mismatched_folder(tmp_path):
    lm = shared_model("tiny_kimi_k2")
    adapter = make_adapter(lm, 4, 34, attn=True, mlp=False, unembed=False)
    save_adapter(tmp_path, adapter, lm.targets, str(lm.path))
    wants_mlp = type(adapter.spec)(4, None, True, True, False)
    with pytest.raises(CheckpointFormatError):
        load_adapter(tmp_path, lm.targets, wants_mlp)
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointFormatError):
        load_adapter(tmp_path, lm.targets)


# ------------------------------------------------------------------------------------------------- optimizer


def _grads_by_name(adapter):
    return {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}


def _set_grads(adapter, g):
    for n, p in adapter.named_parameters():
        p.grad = g[n].clone() if n in g else None


def test_optimizer_round_trip_reproduces_next_step_exactly(tmp_path):
    lm = shared_model("tiny_kimi_k2")
    adapter = make_adapter(lm, 4, 35)  # fresh PEFT init (B = 0), trained for real below
    slot = register(lm, adapter)
    opt = RunOptimizer(adapter)
    hp = AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=1.0)
    item = WorkItem(slot, [ce_datum(token_ids(8, seed=36)), ce_datum(token_ids(5, seed=37))], "cross_entropy")
    try:
        for _ in range(2):
            run_forward_backward(lm, [item])
            opt.step(hp)
        save_adapter(tmp_path, adapter, lm.targets, str(lm.path))
        save_optimizer(tmp_path, opt)
        state = json.loads((tmp_path / "trainer_state.json").read_text())
        assert state["steps"] == 2 and state["lora"]["rank"] == 4 and state["lora"]["seed"] == 35

        resumed = load_adapter(tmp_path, lm.targets)
        assert resumed.spec == adapter.spec  # from trainer_state.json, seed included
        resumed_opt = RunOptimizer(resumed)
        load_optimizer(tmp_path, resumed_opt)
        assert resumed_opt.steps == 2
        cold = RunOptimizer(load_adapter(tmp_path, lm.targets))  # same weights, no moments

        run_forward_backward(lm, [item])  # third step's gradient, shared by all three
        g = _grads_by_name(adapter)
        assert g and any(float(t.abs().max()) > 0 for n, t in g.items() if n.endswith("lora_A"))
        _set_grads(resumed, g)
        _set_grads(cold.adapter, g)
        m1 = opt.step(hp)
        m2 = resumed_opt.step(hp)
        cold.step(hp)
        assert m1 == m2
        for (n, p), (_, q) in zip(adapter.named_parameters(), resumed.named_parameters()):
            assert torch.equal(p, q), f"{n}: resumed step differs"
        differs = sum(
            not torch.equal(p, c) for (_, p), (_, c) in zip(adapter.named_parameters(), cold.adapter.named_parameters())
        )
        assert differs > 0, "a step without Adam moments matched: the round trip check would be vacuous"
    finally:
        lm.router.adapters.pop(slot, None)


def test_load_optimizer_without_state_is_a_format_error(tmp_path):
    lm = shared_model("tiny_kimi_k2")
    adapter = make_adapter(lm, 4, 38)
    save_adapter(tmp_path, adapter, lm.targets, str(lm.path))  # a sampler checkpoint: weights only
    with pytest.raises(CheckpointFormatError):
        load_optimizer(tmp_path, RunOptimizer(load_adapter(tmp_path, lm.targets)))


# --------------------------------------------------------------------------------------------------- store


def _fill(folder: Path) -> None:
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8)
    (folder / "adapter_config.json").write_text('{"r": 4}')


@pytest.fixture
def stored(tmp_path):
    store = LocalCheckpointStore(tmp_path / "store")
    uri, size = store.write("alice", "s1:train:0", "weights/step-1", _fill)
    return store, uri, size


def test_store_round_trip(stored):
    store, uri, size = stored
    folder = store.open(uri)
    assert uri.startswith("file://")
    assert size == 256 * 8 + len('{"r": 4}')
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["adapter_model.safetensors", "adapter_config.json", MANIFEST]
    )
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".staging-")]


def test_store_detects_flipped_byte(stored):
    store, uri, _ = stored
    path = store.open(uri) / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt):
        store.open(uri)


def test_store_detects_truncated_and_missing_files(stored):
    store, uri, _ = stored
    folder = store.open(uri)
    (folder / "adapter_config.json").write_text('{"r"')
    with pytest.raises(CheckpointCorrupt):
        store.open(uri)
    (folder / "adapter_config.json").write_text('{"r": 4}')
    store.open(uri)  # restored content verifies again
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointCorrupt):
        store.open(uri)


def test_store_detects_missing_manifest(stored):
    store, uri, _ = stored
    (store.open(uri) / MANIFEST).unlink()
    with pytest.raises(CheckpointCorrupt):
        store.open(uri)


def test_store_create_only_unless_overwrite(stored):
    store, uri, _ = stored
    with pytest.raises(CheckpointExists):
        store.write("alice", "s1:train:0", "weights/step-1", _fill)

    def other(folder: Path) -> None:
        (folder / "adapter_config.json").write_text('{"r": 8}')

    uri2, _ = store.write("alice", "s1:train:0", "weights/step-1", other, overwrite=True)
    assert uri2 == uri
    folder = store.open(uri)
    assert (folder / "adapter_config.json").read_text() == '{"r": 8}'
    assert not (folder / "adapter_model.safetensors").exists()


def test_store_failed_fill_leaves_nothing(tmp_path):
    store = LocalCheckpointStore(tmp_path / "store")

    def boom(folder: Path) -> None:
        (folder / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.write("alice", "s1:train:0", "weights/x", boom)
    run_dir = tmp_path / "store" / "alice" / "s1_train_0" / "weights"
    assert not run_dir.exists() or not any(run_dir.iterdir())
