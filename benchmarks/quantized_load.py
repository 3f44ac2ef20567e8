"""Load time, peak memory and disk size of Kimi K2's quantised checkpoint formats against the float32 folder.

Builds a random-init DeepseekV3 of a few hundred MB in float32 (hidden 512, 4 layers of which 3 MoE with 16
routed experts, vocabulary 32k), saves it in ~100 MB shards, and rewrites copies into Kimi-K2-Instruct's
block-FP8 (`quantize_fp8_block`) and Kimi-K2-Thinking's int4 (`quantize_int4_compressed`) layouts. Each folder is
then loaded with Loom's loader (`worker/models/loader.py: load_weights`) (dequantising while it loads, into float32
on CPU) in a fresh child process (this script with `--child`), once per repeat, the formats interleaved. Printed
per format: bytes on disk, median load time and median peak resident set (`resource.getrusage(RUSAGE_SELF).ru_maxrss`,
imports included: their share is printed once), each also as a ratio to float32 in the same run.

Limits: CPU only, one machine, the OS page cache warm after the first repeat. Random weights: the figures are the
formats' costs, not Kimi's accuracy. About 1-2 minutes and < 3 GB at the defaults.

    .venv/bin/python benchmarks/quantized_load.py [--repeats 3] [--dir /tmp/quantized-load]
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "0" if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" else "20000")  # as `loom`

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from worker.models.loader import load_weights
from worker.models.model_folder import check_model_folder
from worker.models.quantized_checkpoints import quantize_fp8_block, quantize_int4_compressed

FORMATS: dict[str, Callable[[Path], None] | None] = {
    "fp32": None,
    "fp8": quantize_fp8_block,
    "int4": quantize_int4_compressed,
}
MB = 1 << 20


def bench_config() -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=512,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        n_shared_experts=1,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=1,
        topk_group=1,
        q_lora_rank=256,
        kv_lora_rank=96,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
        tie_word_embeddings=False,
    )


def build(root: Path) -> None:
    """The float32 folder and its quantised copies under `root`, printing how long each rewrite took."""
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(bench_config()).to(torch.float32)
    model.save_pretrained(root / "fp32", max_shard_size="100MB")
    for name, quantise in FORMATS.items():
        if quantise is None:
            continue
        shutil.copytree(root / "fp32", root / name)
        start = time.perf_counter()
        quantise(root / name)
        print(f"rewrote {name} in {time.perf_counter() - start:.1f} s")


def load(folder: Path) -> None:
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    model = load_weights(check_model_folder(folder), torch.float32)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak": peak, "before": before, "params": params}))


def in_child(*args: str) -> str:
    """Run this script with `--child ARGS` and return its output. Linux carries a process's peak resident set
    across `execve`, so a child's `ru_maxrss` starts at this process's resident set: nothing big is built here."""
    done = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return done.stdout


def disk_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="loads per format, interleaved")
    parser.add_argument(
        "--dir", type=Path, help="a new directory to build the folders in and keep (default: temporary)"
    )
    parser.add_argument("--child", nargs=2, metavar=("STEP", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        {"build": build, "load": load}[args.child[0]](Path(args.child[1]))
        return
    root = args.dir or Path(tempfile.mkdtemp(prefix="quantized-load-"))
    print(f"load average at start: {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}")
    try:
        print(in_child("build", str(root)), end="")
        folders = {name: root / name for name in FORMATS}
        disk = {name: disk_bytes(folder) for name, folder in folders.items()}
        runs: dict[str, list[dict]] = {name: [] for name in folders}
        for _ in range(args.repeats):
            for name, folder in folders.items():
                runs[name].append(json.loads(in_child("load", str(folder)).strip().splitlines()[-1]))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    rows = {
        name: {
            "disk": disk[name],
            "seconds": statistics.median(r["seconds"] for r in got),
            "peak": statistics.median(r["peak"] for r in got),
        }
        for name, got in runs.items()
    }
    before = statistics.median(r["before"] for got in runs.values() for r in got)
    print(
        f"{runs['fp32'][0]['params'] / 1e6:.1f}M parameters loaded into float32, medians of {args.repeats} loads; "
        f"resident before the load (imports): {before / MB:.0f} MB"
    )
    print(f"{'format':<6} {'disk MB':>8} {'x':>5} {'load s':>7} {'x':>5} {'peak MB':>8} {'x':>5}")
    for name, row in rows.items():
        ratios = {key: row[key] / rows["fp32"][key] for key in row}
        print(
            f"{name:<6} {row['disk'] / MB:>8.1f} {ratios['disk']:>5.2f} {row['seconds']:>7.2f} "
            f"{ratios['seconds']:>5.2f} {row['peak'] / MB:>8.0f} {ratios['peak']:>5.2f}"
        )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
