"""Peak memory of ONE forward_backward on a base model (default SmolLM2; fp32, CPU), training token budget on vs. off.

Each (configuration, budget) pair runs in a fresh child process (this script with `--child`), so peaks never
mix: the child loads the base model the worker uses (`load_base_model`), creates one training run
(`AdapterPool.create_run`, LoRA rank 8 on attention + MLP + unembedding, Tinker's SDK default), measures its
resident set after loading (`psutil`), runs `worker.trainer.run_forward_backward` once over seeded random
tokens (`cross_entropy`), and reports its peak resident set (`resource.getrusage(RUSAGE_SELF).ru_maxrss`).

Configurations (rows × tokens): 1×512, 1×1024, 64×16, and one long row mixed with short ones (1×384 + 5×16:
without a budget every row is padded to 384). "on" uses `--budget` padded tokens per micro-batch (default
1024 here, to keep the run under ~10 GB; the worker's default is 2048), "off" a budget no pass reaches.
Printed per configuration: padded tokens of the largest micro-batch, peak GB, the pass's increment over the
loaded model, that increment per padded token, and the ratio of peaks off/on (the result: how much the budget
saves; ≈ 1 where the pass already fits).

Limits: CPU only; peak RSS includes allocator caching, so increments are upper bounds, and identical passes
were measured up to ~1 GB apart (64×16 fits either budget, so its off/on ratio is that noise); attention memory
grows with length² per row where SDPA falls back to materialising scores, so bytes per padded token depend on
the row length (reported per configuration). About 2 minutes and < 10 GB on a 2-core machine (`--quick`: the
1×512 and mixed configurations only, about 1 minute).

The "KB/tok" column is what the catalogue's `train_bytes_per_token` (used by admission, `api/admission.py`) is
set from: its largest value over the configurations, rounded up.

    .venv/bin/python benchmarks/train_pass_memory.py [--quick] [--budget 1024] [--model loom/tiny-kimi-k2]
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "0" if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" else "20000")  # as `loom`

import argparse
import json
import resource
import subprocess
import sys

import psutil
import torch

from contract.catalogue import BUILTIN_MODELS, SMOLLM2
from contract.settings import Settings
from worker.adapter_pool import AdapterPool
from worker.lora.adapter import LoraSpec
from worker.models.loader import load_base_model
from worker.trainer import TrainDatum, WorkItem, micro_batches, run_forward_backward

CONFIGS: dict[str, list[int]] = {
    "1x512": [512],
    "1x1024": [1024],
    "64x16": [16] * 64,
    "1x384+5x16": [384] + [16] * 5,
}
OFF = 1 << 40
GB = 1 << 30


def child(config: str, budget: int, model: str) -> None:
    lengths = CONFIGS[config]
    lm = load_base_model(BUILTIN_MODELS[model], Settings().model_cache_dir)
    run = AdapterPool(lm).create_run("bench", LoraSpec(8, 0, True, True, True))
    gen = torch.Generator().manual_seed(0)
    data = []
    for n in lengths:
        tokens = torch.randint(3, 5000, (n + 1,), generator=gen).tolist()
        data.append(TrainDatum(tokens[:-1], {"target_tokens": torch.tensor(tokens[1:])}))
    batches = micro_batches(lengths, [run.slot] * len(lengths), budget)
    padded = max(len(b) * max(lengths[r] for r in b) for b in batches)
    loaded = psutil.Process().memory_info().rss
    run_forward_backward(lm, [WorkItem(run.slot, data, "cross_entropy")], token_budget=budget)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"peak": peak, "loaded": loaded, "padded": padded, "micro_batches": len(batches)}))


def measure(config: str, budget: int, model: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", config, str(budget), model], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=1024, help="padded tokens per micro-batch when on")
    parser.add_argument("--quick", action="store_true", help="only the 1x512 and the mixed configuration")
    parser.add_argument("--model", default=SMOLLM2.name, choices=sorted(BUILTIN_MODELS), help="base model")
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "BUDGET", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    print(f"{args.model} fp32, one forward_backward, budget on = {args.budget} padded tokens, off = unbounded")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    print(f"{'config':<12} {'budget':<6} {'mbatches':>8} {'padded':>7} {'peak GB':>8} {'pass GB':>8} {'KB/tok':>8}")
    for config in ["1x512", "1x384+5x16"] if args.quick else CONFIGS:
        peaks = {}
        for label, budget in (("off", OFF), ("on", args.budget)):
            m = measure(config, budget, args.model)
            increment = m["peak"] - m["loaded"]
            peaks[label] = m["peak"]
            print(
                f"{config:<12} {label:<6} {m['micro_batches']:>8} {m['padded']:>7} {m['peak'] / GB:>8.2f} "
                f"{increment / GB:>8.2f} {increment / m['padded'] / 1024:>8.0f}"
            )
        print(f"{config:<12} peak off/on = {peaks['off'] / peaks['on']:.2f}x")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
