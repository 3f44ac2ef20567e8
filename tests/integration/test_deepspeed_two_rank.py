"""Two CPU ranks shard the frozen tiny Kimi K2 with DeepSpeed ZeRO-3 (worker/sharded_base.py); LoRA stays per run.

The ranks run as a subprocess (this file run as a script, two processes from torch.multiprocessing.spawn, gloo,
DeepSpeed's CPU accelerator) under the first Python that imports `deepspeed`: this interpreter, else
.venv-ds/bin/python (made by scripts/setup-deepspeed; CI=true runs the script first). Without one the test is
skipped. The reference runs in this pytest process, without DeepSpeed or torch.distributed.

The model is the registry's tiny Kimi K2 config with the vocabulary cut to VOCAB (8,192 instead of 129,280, which
would make embedding + unembedding 98% of the parameters and the run several times slower), random init with seed
0, saved once with `save_pretrained`. Every side loads that folder, wraps it with `install_multi_lora` and creates
two run adapters (seeds 11 and 12, rank 4, attention + MLP + routed experts + unembedding, B drawn N(0, 0.02²) so A
gets gradients too). Each run has two datums; as `loom worker --zero3` does (worker/lockstep.py), every rank trains
the whole batch, all four datums, through the ordinary trainer (`run_forward_backward`, one mixed batch) with no
gradient all-reduce: the ranks split memory, not work. The reference trains the same batch in one process. The
ranks do this twice, once per way of sharding:
- "materialised": plain `from_pretrained`, then `shard_frozen_base` partitions the whole model;
- "loaded": `load_sharded_base`, partitioned while loading (transformers' ZeRO-3 path).

Checked, for both:
(a) each rank stores only its partition of every base parameter (ds_tensor numel = ceil(numel / 2)), the two
    partitions cover the model, nothing stays gathered after forward/backward, and the adapters are not
    partitioned (no ds_id, full size) and cover the routed experts;
(b) per-datum losses and every LoRA gradient equal the reference, and both ranks hold identical gradients.
Tolerance (float32; ZeRO-3 gathers exact parameters, so only the order of float sums may differ): losses rtol
LOSS_RTOL; per LoRA tensor, max|diff| <= GRAD_RTOL · max|reference grad|. The measured values are printed (run
with -s).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

try:
    import pytest
except ImportError:  # the ranks run this file under .venv-ds, which has no pytest
    pytest = None
else:
    pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
LORA_RANK = 4
RUN_SEEDS = (11, 12)
VOCAB = 8192
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
PATHS = ("materialised", "loaded")


# ---- shared by the ranks and the reference (must stay free of deepspeed imports) ----


def save_model(folder: Path) -> None:
    from transformers import DeepseekV3ForCausalLM

    from tests.tiny_configs import tiny_kimi_k2_config

    config = tiny_kimi_k2_config()
    config.vocab_size = VOCAB
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(config).to(torch.float32).save_pretrained(folder)


def load_model(folder: Path):
    """Plain load, as worker/models/loader.py does (float32, sdpa, frozen, multi-LoRA wrapped)."""
    from transformers import AutoModelForCausalLM

    from contract.catalogue import TINY_KIMI_K2
    from worker.lora.layers import install_multi_lora
    from worker.models.registry import lora_targets

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    model.requires_grad_(False)
    router, targets = install_multi_lora(model, lora_targets(TINY_KIMI_K2))
    return model, router, targets


def attach_adapters(model, router, targets):
    from contract.catalogue import TINY_KIMI_K2
    from worker.lora.adapter import LoraSpec, create_adapter
    from worker.models.loader import LoadedModel

    adapters = {}
    for slot, seed in enumerate(RUN_SEEDS):
        adapter = create_adapter(targets, LoraSpec(LORA_RANK, seed, True, True, True))
        gen = torch.Generator().manual_seed(10_000 + seed)
        with torch.no_grad():
            for _, b in adapter.params.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
        router.adapters[slot] = adapter
        adapters[slot] = adapter
    return LoadedModel(TINY_KIMI_K2, Path("."), model, None, router, targets), adapters


def work_items():
    """Two runs x two cross-entropy datums (lengths 13 and 9; run 1 weighted)."""
    from worker.trainer import TrainDatum, WorkItem

    items = []
    for slot in range(len(RUN_SEEDS)):
        data = []
        for d, n in enumerate((13, 9)):
            gen = torch.Generator().manual_seed(100 * slot + d)
            toks = torch.randint(3, 5000, (n,), generator=gen).tolist()
            inputs = {"target_tokens": torch.tensor(toks[1:])}
            if slot == 1:
                inputs["weights"] = torch.rand(n - 1, generator=gen)
            data.append(TrainDatum(toks[:-1], inputs))
        items.append(WorkItem(slot, data, "cross_entropy"))
    return items


# ---- the two ranks (run as a script under a Python that has deepspeed) ----


def _rank_step(lm, adapters) -> dict:
    from worker.sharded_base import partition_sizes
    from worker.trainer import run_forward_backward

    sizes_before = partition_sizes(lm.model)
    per_param = {n: (p.ds_numel, p.ds_tensor.numel()) for n, p in lm.model.named_parameters()}
    t0 = time.perf_counter()
    results = run_forward_backward(lm, work_items())
    return {
        "losses": {slot: res.losses for slot, res in zip(range(len(RUN_SEEDS)), results)},
        "grads": {slot: {n: p.grad for n, p in a.named_parameters()} for slot, a in adapters.items()},
        "sizes_before": sizes_before,
        "sizes_after": partition_sizes(lm.model),
        "per_param": per_param,
        "lora_partitioned": [n for a in adapters.values() for n, p in a.named_parameters() if hasattr(p, "ds_id")],
        "lora_numel": sum(p.numel() for a in adapters.values() for p in a.parameters()),
        "expert_targets": sum(t.num_experts > 1 for t in lm.targets),
        "step_seconds": time.perf_counter() - t0,
    }


def _rank_main(rank: int, world: int, port: int, folder: str, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from contract.catalogue import TINY_KIMI_K2
    from worker.models.model_folder import check_model_folder
    from worker.models.registry import lora_targets
    from worker.sharded_base import init_distributed, load_sharded_base, shard_frozen_base

    init_distributed()
    out = {}
    # Whole model on every rank, then partitioned (before any HfDeepSpeedConfig exists: that one makes every
    # later from_pretrained in the process load partitioned).
    model, router, targets = load_model(Path(folder))
    sharded = shard_frozen_base(model)
    out["materialised"] = _rank_step(*attach_adapters(sharded.module, router, targets))
    # Partitioned while loading.
    sharded, router, targets = load_sharded_base(check_model_folder(Path(folder)), lora_targets(TINY_KIMI_K2))
    out["loaded"] = _rank_step(*attach_adapters(sharded.module, router, targets))
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()


def _main(folder: str, out_dir: str) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(WORLD, port, folder, out_dir), nprocs=WORLD)


# ---- the pytest side ----


def test_zero3_two_ranks_match_single_process(tmp_path: Path, ranks_leave_no_shm) -> None:
    from tests.integration.deepspeed_fixtures import deepspeed_python, rank_env  # pytest side only

    python = deepspeed_python()
    if python is None:
        pytest.skip("deepspeed cannot be imported here or from .venv-ds: run scripts/setup-deepspeed")
    folder = tmp_path / "tiny-kimi-k2"
    save_model(folder)
    env = rank_env(python)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), str(folder), str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"ranks failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    torch.set_num_threads(1)
    lm, adapters = attach_adapters(*load_model(folder))
    from worker.trainer import run_forward_backward

    ref_results = run_forward_backward(lm, work_items())
    full_numel = sum(p.numel() for p in lm.model.parameters())
    report = [f"\n[deepspeed zero-3, {WORLD} CPU ranks, subprocess wall {wall:.1f}s] base params {full_numel:,}"]
    for path in PATHS:
        outs = [r[path] for r in ranks]
        # (a) partitioned base, replicated LoRA
        for r, out in enumerate(outs):
            before, after = out["sizes_before"], out["sizes_after"]
            assert before["full"] == full_numel, (path, r, before)
            assert before["materialised"] == 0 and after["materialised"] == 0, (path, r, before, after)
            for name, (numel, partition) in out["per_param"].items():
                assert partition == math.ceil(numel / WORLD), (path, name, numel, partition)
            assert before["local"] <= math.ceil(full_numel / WORLD) + len(out["per_param"]), (path, before)
            assert out["lora_partitioned"] == [], (path, out["lora_partitioned"])
            assert out["lora_numel"] == sum(p.numel() for a in adapters.values() for p in a.parameters()), path
            assert out["expert_targets"] == sum(t.num_experts > 1 for t in lm.targets) > 0, path
        assert sum(out["sizes_before"]["owned"] for out in outs) == full_numel, path

        # (b) same losses and LoRA gradients as one process over the whole batch
        max_loss_rel = 0.0
        for slot, res in enumerate(ref_results):
            for out in outs:
                for got, want in zip(out["losses"][slot], res.losses, strict=True):
                    max_loss_rel = max(max_loss_rel, abs(got - want) / abs(want))
        assert max_loss_rel <= LOSS_RTOL, (path, max_loss_rel)
        max_diff = max_rank_diff = max_rel = 0.0
        for slot, adapter in adapters.items():
            for name, p in adapter.named_parameters():
                want = p.grad
                assert want is not None and want.abs().max() > 0, name
                got0, got1 = outs[0]["grads"][slot][name], outs[1]["grads"][slot][name]
                max_rank_diff = max(max_rank_diff, float((got0 - got1).abs().max()))
                diff, scale = float((got0 - want).abs().max()), float(want.abs().max())
                assert diff <= GRAD_RTOL * scale, (path, slot, name, diff, scale)
                max_diff, max_rel = max(max_diff, diff), max(max_rel, diff / scale)
        assert max_rank_diff == 0.0, path
        report.append(
            f"{path}: per rank local {[o['sizes_before']['local'] for o in outs]} owned "
            f"{[o['sizes_before']['owned'] for o in outs]}; LoRA per rank {outs[0]['lora_numel']:,} (replicated); "
            f"max loss rel diff {max_loss_rel:.1e}; max |grad diff| {max_diff:.1e}, max per-tensor "
            f"|diff|/max|grad| {max_rel:.1e}; step s {[round(o['step_seconds'], 2) for o in outs]}"
        )
    print("\n  ".join(report))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
