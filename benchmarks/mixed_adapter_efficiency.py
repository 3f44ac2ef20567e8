"""Throughput of ONE mixed-adapter forward/backward over 16 tenants, against one adapter and against 16 passes.

In process (no server): loads the base model the worker uses (`load_base_model`, multi-LoRA wrappers installed),
creates 16 training runs with `AdapterPool.create_run` (LoRA rank 8, attn + mlp, plus unembed as Tinker's SDK
default unless --no-unembed), and builds 16 `WorkItem`s of D datums x L tokens each (random token ids from a
seeded generator, `cross_entropy`, weight 1). Three ways to process the same 16·D·L tokens, timed around
`worker.trainer.run_forward_backward` (forward, per-datum loss, one backward):

  (a) mixed:      one call with all 16 items (16 adapters, rows grouped by adapter) — what a worker tick does;
  (b) single:     one call with ONE item of 16·D datums on one adapter (same tokens) — the ceiling: same
                  batch shape, no per-adapter segmentation;
  (c) sequential: 16 calls, one item/adapter each — time-slicing tenants, the baseline a mixed batch replaces.

Reported: tokens/s of each (median of --reps repetitions), efficiency = (a)/(b) (target >= 0.85: mixing 16
tenants costs at most 15% against one tenant with the same batch), and speedup = (a)/(c).

Method: one warm-up of each path first; then each repetition runs (a), (b), (c) back to back, so load from
other processes hits all three alike; every adapter's grads are set to None before every timed call (outside
the timer), so no call pays for accumulation into existing grads. torch's default thread count is used unless
--threads is given. Idle OpenMP threads spin briefly (GOMP_SPINCOUNT=20000), as under `loom` (an exported
OMP_WAIT_POLICY or GOMP_SPINCOUNT wins): with long spinning waits on an oversubscribed machine (load average above
the core count: other jobs), torch's 2 OpenMP threads ran several times slower than 1 thread.

Limits:
- CPU only here (the torch reference twin of the multi-LoRA kernels, `gpu_kernels.lora_reference`); GPU
  kernels are not measured. Padded, not packed, batches of equal length, so padding costs nothing here.
- Optimizer steps are not included (they are per run and identical in all three paths).
- Random tokens: the loss values are meaningless; only time is measured.
- (b) is the natural ceiling for (a) but not a hard one on CPU: one 16·D·L-token pass materialises the whole
  (rows x L x vocab) logits (400 MB for SmolLM2 at the defaults), so 16 small passes can be more cache
  friendly and (c) can beat (b).
- On a noisy 2-core machine the absolute tokens/s move between runs; the ratios are the result.

    .venv/bin/python benchmarks/mixed_adapter_efficiency.py [--quick] [--model smollm2|tiny-kimi-k2]
                     [--adapters 16] [--datums 2] [--seq-len 64] [--reps 5] [--no-unembed] [--threads N]
"""

from __future__ import annotations

import os

# The worker runs under `loom`, which defaults GOMP_SPINCOUNT=20000 (api/cli.py); mirror it so this in-process
# measurement sees the production torch runtime. Must be set before torch loads libgomp.
os.environ.setdefault("GOMP_SPINCOUNT", "0" if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" else "20000")  # as `loom`

import argparse
import statistics
import time

import torch

from contract.catalogue import SMOLLM2, TINY_KIMI_K2
from contract.settings import Settings
from worker.adapter_pool import AdapterPool
from worker.lora.adapter import LoraSpec
from worker.models.loader import load_base_model
from worker.trainer import TrainDatum, WorkItem, run_forward_backward

MODELS = {"smollm2": SMOLLM2, "tiny-kimi-k2": TINY_KIMI_K2}


def make_datum(gen: torch.Generator, vocab: int, length: int) -> TrainDatum:
    ids = torch.randint(0, vocab, (length + 1,), generator=gen)
    return TrainDatum(
        tokens=ids[:-1].tolist(),
        inputs={"target_tokens": ids[1:].clone(), "weights": torch.ones(length)},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repetitions instead of 5")
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--datums", type=int, default=2, help="datums per adapter (D)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per datum (L)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per path (default 5, quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--no-unembed", action="store_true", help="no LoRA on lm_head (Tinker's default trains it)")
    args = ap.parse_args()
    reps = args.reps or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_ad, d, length = args.adapters, args.datums, args.seq_len

    spec = MODELS[args.model]
    t0 = time.perf_counter()
    lm = load_base_model(spec, Settings().model_cache_dir)
    load_s = time.perf_counter() - t0
    pool = AdapterPool(lm)
    runs = [
        pool.create_run(
            f"bench-{i}",
            LoraSpec(rank=args.rank, seed=i, train_attn=True, train_mlp=True, train_unembed=not args.no_unembed),
        )
        for i in range(n_ad)
    ]
    adapters = [r.adapter for r in runs]

    gen = torch.Generator().manual_seed(0)
    per_adapter = [[make_datum(gen, lm.vocab_size, length) for _ in range(d)] for _ in range(n_ad)]
    mixed = [WorkItem(slot=r.slot, data=data, loss_fn="cross_entropy") for r, data in zip(runs, per_adapter)]
    single = [WorkItem(slot=runs[0].slot, data=[x for data in per_adapter for x in data], loss_fn="cross_entropy")]
    tokens = n_ad * d * length

    def zero_all() -> None:
        for a in adapters:
            a.zero_grad()

    def run_mixed() -> None:
        run_forward_backward(lm, mixed)

    def run_single() -> None:
        run_forward_backward(lm, single)

    def run_sequential() -> None:
        for item in mixed:
            run_forward_backward(lm, [item])

    paths = {"mixed": run_mixed, "single": run_single, "sequential": run_sequential}

    def timed(fn) -> float:
        zero_all()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    print(
        f"# mixed_adapter_efficiency: model={spec.name} adapters={n_ad} rank={args.rank} "
        f"unembed={not args.no_unembed} D={d} L={length} tokens/pass={tokens} reps={reps} "
        f"torch_threads={torch.get_num_threads()} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
        f"cpus={os.cpu_count()} load={load_s:.1f}s "
        f"loadavg={os.getloadavg()[0]:.2f}",
        flush=True,
    )
    # Sanity: the mixed pass gives every adapter a gradient, and the single pass only adapter 0.
    zero_all()
    run_mixed()
    assert all(any(p.grad is not None for p in a.parameters()) for a in adapters), "some adapter got no gradient"
    warm = {name: timed(fn) for name, fn in paths.items() if name != "mixed"}
    print("warm-up s: " + ", ".join(f"{k} {v:.3f}" for k, v in warm.items()), flush=True)

    times: dict[str, list[float]] = {name: [] for name in paths}
    for rep in range(reps):
        for name, fn in paths.items():
            times[name].append(timed(fn))
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    zero_all()

    med = {name: statistics.median(ts) for name, ts in times.items()}
    tps = {name: tokens / med[name] for name in paths}
    labels = {
        "mixed": f"(a) mixed: 1 pass, {n_ad} adapters x {d} datums",
        "single": f"(b) single: 1 pass, 1 adapter x {n_ad * d} datums",
        "sequential": f"(c) sequential: {n_ad} passes x {d} datums",
    }
    print()
    print(f"| {'path':<44} | {'median s':>8} | {'min s':>7} | {'max s':>7} | {'tokens/s':>9} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 9}|{'-' * 9}|{'-' * 11}|")
    for name in paths:
        ts = times[name]
        print(f"| {labels[name]:<44} | {med[name]:>8.3f} | {min(ts):>7.3f} | {max(ts):>7.3f} | {tps[name]:>9.0f} |")
    eff = tps["mixed"] / tps["single"]
    speedup = tps["mixed"] / tps["sequential"]
    print(f"efficiency (a)/(b) = {eff:.3f}   (target >= 0.85: {'met' if eff >= 0.85 else 'NOT met'})")
    print(f"speedup    (a)/(c) = {speedup:.2f}x")
    print(f"loadavg at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
