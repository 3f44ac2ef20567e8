"""Loom's performance suite: one entry point, every figure a ratio against a baseline measured in the same run.

Sections (`--only` picks some; all by default):

1. `layer`: one mixed-adapter LoRA layer (SmolLM2's 576 → 576, 2,048 tokens split unevenly over N ∈ {1, 4, 16, 64}
   adapters, r ∈ {8, 32}), forward + backward: a Python loop per adapter, a padded `bmm` (segments padded to the
   longest), Loom's dispatch (`gpu_kernels.dispatch.add_segment_deltas`: the Triton kernels on a GPU, the torch
   reference here) and the base matmul alone. Ratios: each path ÷ base-only.
2. `train`: one SmolLM2 SL step (forward_backward + Adam) on the fixed 4×64 batch and on a mixed-length batch (8
   sequences, lengths drawn log-normally in 20-1,000 tokens like chat data, seeded), Loom's engine in process
   (`run_forward_backward` + `RunOptimizer`, LoRA r=8 on attention + MLP; packed, and padded for comparison)
   against plain transformers + peft in process on the same batch (padded with an attention mask, the usual user
   loop). Also the achieved training
   FLOP/s (4 × frozen params × real tokens + attention, the LoRA terms ignored) ÷ this machine's `torch.mm` FLOP/s
   (2,048², measured here). The SDK's own overhead on top of the engine is `optim_step_roundtrip.py`'s figure.
3. `mixed`: 16 tenants (one 64-token datum each) in one pass ÷ the same 16 passes one after another, and 64
   adapters ÷ 1 adapter over equal tokens (64 datums × 32 tokens).
4. `memory`: peak RSS of one training pass in a fresh child process each: a 4,096-token sequence on Loom's
   miniature Qwen3 (`loom/tiny-qwen3-moe`, the real 151,936-word vocabulary) with chunked logprobs ÷ with the logits
   materialised; the mixed-length SmolLM2 batch the issue names (8 × 16-256 tokens, 925 in all) with Loom's
   defaults and with the old path (padded rows, materialised logits, no checkpointing); and one 8,192-token SmolLM2 sequence
   with the defaults (activation checkpointing from 4,096 tokens). Each child pages its weights in with a short
   warm-up pass first, then reports the process's peak RSS during the measured pass (Linux `VmHWM`, reset through
   `/proc/self/clear_refs`), the pass's part of it, and the RSS left after it. Loom's cases run as a worker does
   (`worker/heap.py`'s mmap threshold); the old path also with glibc's default heap.

Writes `benchmarks/results/perf_suite.{md,json,png}`. Nothing asserts; targets print as met / NOT met.
Limits: CPU figures from a shared 2-core machine (ratios, not absolutes, are the result); RSS peaks include the
allocator's caching; on a GPU the `layer` section times the kernels, the rest still runs on the CPU unless
`LOOM_DEVICE` says otherwise (MFU on a GPU is not computed here). `--quick`: fewer repetitions (about 4 minutes).

    .venv/bin/python benchmarks/perf_suite.py [--quick] [--only layer,train,mixed,memory]
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "0" if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" else "20000")  # as `loom`

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from contract.catalogue import BUILTIN_MODELS, SMOLLM2, TINY_QWEN3_MOE
from contract.settings import Settings
from gpu_kernels.dispatch import add_segment_deltas
from gpu_kernels.lora_reference import LoraFactors
from loom.types import AdamParams
from worker.adapter_pool import AdapterPool
from worker.heap import cap_heap_blocks
from worker.lora.adapter import LoraSpec
from worker.models.loader import load_base_model
from worker.models.runtime import ModelRuntime, runtime_for
from worker.trainer import TrainDatum, WorkItem, run_forward_backward

RESULTS = Path(__file__).resolve().parent / "results"
GB = 1 << 30
ISSUE_MIXED = [16, 23, 41, 64, 97, 128, 200, 256]  # 925 tokens, 16-256 each
TARGETS = {
    "sl_fixed": 0.8,
    "sl_mixed": 0.5,
    "flop_efficiency": 0.6,
    "mixed_64_vs_1": 0.9,
    "mixed_16_vs_sequential": 2.0,
    "chunked_memory": 0.3,
    "mixed_batch_rss_gib": 2.5,
}


def timed(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of `reps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# -- 1. one LoRA layer -----------------------------------------------------------------------------------------------


def layer_case(rank: int, n: int, reps: int, gen: torch.Generator) -> dict:
    tokens, width = 2048, 576
    weight = torch.randn(width, width, generator=gen) / width**0.5
    cuts = sorted(torch.randperm(tokens - 1, generator=gen)[: n - 1].add(1).tolist())
    bounds = list(zip([0, *cuts], [*cuts, tokens]))
    factors = [
        LoraFactors(
            torch.randn(rank, width, generator=gen).mul_(0.02).requires_grad_(),
            torch.randn(width, rank, generator=gen).mul_(0.02).requires_grad_(),
            2.0,
        )
        for _ in range(n)
    ]
    x = torch.randn(tokens, width, generator=gen, requires_grad=True)
    segments = [(a, b, f) for (a, b), f in zip(bounds, factors)]
    longest = max(b - a for a, b in bounds)
    a_stack = torch.stack([f.a for f in factors])
    b_stack = torch.stack([f.b for f in factors])

    def base_only() -> None:
        (x @ weight.T).sum().backward()

    def loop() -> None:
        parts = [(x[a:b] @ f.a.T) @ f.b.T * f.scale for a, b, f in segments]
        (x @ weight.T + torch.cat(parts)).sum().backward()

    def padded_bmm() -> None:
        padded = torch.zeros(n, longest, width)
        for i, (a, b) in enumerate(bounds):
            padded[i, : b - a] = x[a:b]
        delta = torch.bmm(torch.bmm(padded, a_stack.transpose(1, 2)), b_stack.transpose(1, 2)) * 2.0
        (x @ weight.T + torch.cat([delta[i, : b - a] for i, (a, b) in enumerate(bounds)])).sum().backward()

    def dispatched() -> None:
        add_segment_deltas(x @ weight.T, x, segments).sum().backward()

    row = {"rank": rank, "adapters": n, "base_ms": timed(base_only, reps) * 1e3}
    for name, fn in (("loop", loop), ("padded_bmm", padded_bmm), ("loom", dispatched)):
        row[f"{name}_ms"] = timed(fn, reps) * 1e3
        row[f"{name}_vs_base"] = row[f"{name}_ms"] / row["base_ms"]
    return row


def layer_section(reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for rank in (8, 32):
        for n in (1, 4, 16, 64):
            row = layer_case(rank, n, reps, gen)
            rows.append(row)
            print(
                f"layer r={rank:<2} N={n:<2} base {row['base_ms']:6.2f} ms | loop {row['loop_vs_base']:.2f}x "
                f"padded bmm {row['padded_bmm_vs_base']:.2f}x loom {row['loom_vs_base']:.2f}x",
                flush=True,
            )
    return rows


# -- 2. one SL step: Loom's engine vs HF + peft -------------------------------------------------------------------


def chat_lengths(count: int, seed: int) -> list[int]:
    """Log-normal lengths clipped to 20-1,000 tokens (median ≈ 150), the shape of chat SFT data."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.exp(torch.randn(count, generator=gen) * 0.9 + 5.0)
    return [int(min(1000, max(20, d))) for d in draws.tolist()]


def sequences(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 40_000, (n + 1,), generator=gen).tolist() for n in lengths]


class LoomStep:
    def __init__(self, lm, seqs: list[list[int]]) -> None:
        self.run = AdapterPool(lm).create_run("bench", LoraSpec(8, 0, True, True, False))
        self.lm, self.hp = lm, AdamParams(learning_rate=1e-4)
        self.data = [TrainDatum(s[:-1], {"target_tokens": torch.tensor(s[1:])}) for s in seqs]

    def __call__(self) -> None:
        run_forward_backward(self.lm, [WorkItem(self.run.slot, self.data, "cross_entropy")])
        self.run.optimizer.step(self.hp)


class HfPeftStep:
    def __init__(self, seqs: list[list[int]]) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from worker.models.registry import model_dir

        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir(SMOLLM2, Settings().model_cache_dir)), dtype=torch.float32, attn_implementation="sdpa"
        )
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        self.model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        width = max(len(s) for s in seqs) - 1
        self.x = torch.zeros(len(seqs), width, dtype=torch.long)
        self.y = torch.full((len(seqs), width), -100, dtype=torch.long)
        self.mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            self.x[r, : len(s) - 1], self.y[r, : len(s) - 1], self.mask[r, : len(s) - 1] = (
                torch.tensor(s[:-1]),
                torch.tensor(s[1:]),
                1,
            )

    def __call__(self) -> None:
        logits = self.model(input_ids=self.x, attention_mask=self.mask, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.y.flatten(), reduction="sum")
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def matmul_flops(reps: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / timed(lambda: a @ b, reps * 4)


def step_flops(lm, lengths: list[int]) -> float:
    """Forward + input-gradient backward of a frozen base (4 × params per token), plus causal attention
    (2 × 2 × 2 × layers × hidden × n²/2 per sequence, forward and backward)."""
    config = lm.model.config
    params = sum(p.numel() for p in lm.model.parameters())
    attention = sum(4 * config.num_hidden_layers * config.hidden_size * n * n for n in lengths)
    return 4 * params * sum(lengths) + attention


def train_section(reps: int) -> dict:
    lm = load_base_model(SMOLLM2, Settings().model_cache_dir)
    peak = matmul_flops(reps)
    print(f"torch.mm 2048² fp32: {peak / 1e9:.0f} GFLOP/s", flush=True)
    out = {"matmul_gflops": peak / 1e9}
    packed_runtime = lm.runtime
    for name, lengths in (("fixed_4x64", [64] * 4), ("mixed_chat", chat_lengths(8, seed=1))):
        seqs = sequences([n + 1 for n in lengths], seed=2)
        loom_s = timed(LoomStep(lm, seqs), reps)
        lm.runtime = dataclasses.replace(packed_runtime, pack_sequences=False)
        padded_s = timed(LoomStep(lm, seqs), reps)
        lm.runtime = packed_runtime
        hf_s = timed(HfPeftStep(seqs), reps)
        flops = step_flops(lm, lengths)
        out[name] = {
            "lengths": lengths,
            "loom_s": loom_s,
            "loom_padded_s": padded_s,
            "hf_peft_s": hf_s,
            "loom_vs_hf": loom_s / hf_s,
            "loom_padded_vs_hf": padded_s / hf_s,
            "loom_flop_efficiency": flops / loom_s / peak,
            "hf_flop_efficiency": flops / hf_s / peak,
        }
        print(
            f"SL step {name} ({sum(lengths)} tokens): Loom {loom_s:.2f} s (padded {padded_s:.2f} s), HF+PEFT "
            f"{hf_s:.2f} s → {loom_s / hf_s:.2f}x; FLOP efficiency Loom {out[name]['loom_flop_efficiency']:.2f}, "
            f"HF {out[name]['hf_flop_efficiency']:.2f}",
            flush=True,
        )
    return out


# -- 3. mixing tenants ---------------------------------------------------------------------------------------------


def mixed_section(reps: int) -> dict:
    lm = load_base_model(SMOLLM2, Settings().model_cache_dir)
    pool = AdapterPool(lm)
    runs = [pool.create_run(f"t{i}", LoraSpec(8, i, True, True, True)) for i in range(64)]
    gen = torch.Generator().manual_seed(3)

    def datum(n: int) -> TrainDatum:
        ids = torch.randint(3, 40_000, (n + 1,), generator=gen)
        return TrainDatum(ids[:-1].tolist(), {"target_tokens": ids[1:].clone()})

    sixteen = [WorkItem(r.slot, [datum(64)], "cross_entropy") for r in runs[:16]]
    mixed16 = timed(lambda: run_forward_backward(lm, sixteen), reps)
    sequential16 = timed(lambda: [run_forward_backward(lm, [item]) for item in sixteen], reps)
    many = [WorkItem(r.slot, [datum(32)], "cross_entropy") for r in runs]
    one = [WorkItem(runs[0].slot, [d for item in many for d in item.data], "cross_entropy")]
    mixed64 = timed(lambda: run_forward_backward(lm, many), reps)
    single = timed(lambda: run_forward_backward(lm, one), reps)
    out = {
        "mixed16_s": mixed16,
        "sequential16_s": sequential16,
        "mixed16_speedup": sequential16 / mixed16,
        "adapters64_s": mixed64,
        "adapter1_s": single,
        "adapters64_efficiency": single / mixed64,
    }
    print(
        f"16 tenants mixed {mixed16:.2f} s vs sequential {sequential16:.2f} s → {out['mixed16_speedup']:.2f}x; "
        f"64 adapters vs 1 at equal tokens: efficiency {out['adapters64_efficiency']:.2f}",
        flush=True,
    )
    return out


# -- 4. memory, one child process per measurement ---------------------------------------------------------------


MEMORY_CASES = {
    # name: (model, sequence lengths, logprob chunk bytes (None: default), checkpoint tokens (None: default), packed)
    "qwen3_4k_chunked": (TINY_QWEN3_MOE.name, [4096], None, 0, True),
    "qwen3_4k_materialised": (TINY_QWEN3_MOE.name, [4096], 0, 0, True),
    "smollm2_mixed_defaults": (SMOLLM2.name, ISSUE_MIXED, None, None, True),
    "smollm2_mixed_checkpointed": (SMOLLM2.name, ISSUE_MIXED, None, 1, True),
    "smollm2_mixed_old_path": (SMOLLM2.name, ISSUE_MIXED, 0, 0, False),
    "smollm2_8k_defaults": (SMOLLM2.name, [8192], None, None, True),
}


def memory_child(case: str) -> None:
    model, lengths, chunk, checkpoint, packed = MEMORY_CASES[case]
    settings = Settings()
    if not case.endswith("old_path"):  # as `start_workers` does
        cap_heap_blocks(settings.malloc_mmap_threshold)
    defaults = runtime_for(settings)
    runtime = ModelRuntime(
        defaults.device,
        defaults.dtype,
        defaults.logprob_chunk_bytes if chunk is None else chunk,
        defaults.checkpoint_tokens if checkpoint is None else checkpoint,
        packed,
    )
    lm = load_base_model(BUILTIN_MODELS[model], Settings().model_cache_dir, runtime)
    run = AdapterPool(lm).create_run("bench", LoraSpec(8, 0, True, True, True))
    data = [TrainDatum(s[:-1], {"target_tokens": torch.tensor(s[1:])}) for s in sequences([n + 1 for n in lengths], 4)]
    warm = [TrainDatum(s[:-1], {"target_tokens": torch.tensor(s[1:])}) for s in sequences([17], 5)]
    run_forward_backward(lm, [WorkItem(run.slot, warm, "cross_entropy")])  # pages the weights in
    loaded = psutil.Process().memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) restarts from here
    t = time.perf_counter()
    run_forward_backward(lm, [WorkItem(run.slot, data, "cross_entropy")], token_budget=max(8192, sum(lengths)))
    seconds = time.perf_counter() - t
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    after = psutil.Process().memory_info().rss
    print(
        json.dumps(
            {"peak_gib": peak / GB, "pass_gib": (peak - loaded) / GB, "after_gib": after / GB, "seconds": seconds}
        )
    )


def memory_section() -> dict:
    out = {}
    for case in MEMORY_CASES:
        done = subprocess.run(
            [sys.executable, __file__, "--memory-child", case], capture_output=True, text=True, check=False
        )
        if done.returncode:
            out[case] = {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
        else:
            out[case] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"memory {case}: {out[case]}", flush=True)
    chunked, materialised = out["qwen3_4k_chunked"], out["qwen3_4k_materialised"]
    if "pass_gib" in chunked and "pass_gib" in materialised:
        out["qwen3_4k_pass_ratio"] = chunked["pass_gib"] / materialised["pass_gib"]
    return out


# -- report ----------------------------------------------------------------------------------------------------------


def report(results: dict) -> str:
    host = f"Host: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}, "
    lines = ["# Loom performance suite", "", host + f"load average at end {os.getloadavg()[0]:.1f}.", ""]
    if "layer" in results:
        lines += ["## 1. Mixed-adapter LoRA layer (2,048 tokens, 576 → 576, forward + backward; × base-only)", ""]
        lines += ["| r | adapters | base ms | loop | padded bmm | Loom |", "|---|---|---|---|---|---|"]
        for row in results["layer"]:
            lines.append(
                f"| {row['rank']} | {row['adapters']} | {row['base_ms']:.2f} | {row['loop_vs_base']:.2f}x "
                f"| {row['padded_bmm_vs_base']:.2f}x | {row['loom_vs_base']:.2f}x |"
            )
        lines.append("")
    if "train" in results:
        train = results["train"]
        lines += ["## 2-3. SL step, Loom's engine vs HF + peft in process; FLOP efficiency", ""]
        lines += [f"`torch.mm` 2048² fp32 here: {train['matmul_gflops']:.0f} GFLOP/s.", ""]
        lines += [
            "| batch | tokens | Loom s | Loom padded s | HF+PEFT s | Loom ÷ HF | target | Loom FLOP eff. | HF FLOP eff. |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|"]
        for name, target in (("fixed_4x64", "sl_fixed"), ("mixed_chat", "sl_mixed")):
            r = train[name]
            lines.append(
                f"| {name} | {sum(r['lengths'])} | {r['loom_s']:.2f} | {r['loom_padded_s']:.2f} | {r['hf_peft_s']:.2f} "
                f"| {r['loom_vs_hf']:.2f}x "
                f"| ≤ {TARGETS[target]} {verdict(r['loom_vs_hf'] <= TARGETS[target])} "
                f"| {r['loom_flop_efficiency']:.2f} ({verdict(r['loom_flop_efficiency'] >= 0.6)}) "
                f"| {r['hf_flop_efficiency']:.2f} |"
            )
        lines.append("")
    if "mixed" in results:
        m = results["mixed"]
        lines += ["## 4. Tenants mixed in one pass", ""]
        lines.append(
            f"- 16 tenants × 64 tokens: mixed {m['mixed16_s']:.2f} s, sequential {m['sequential16_s']:.2f} s → "
            f"**{m['mixed16_speedup']:.2f}x** (target ≥ 2: {verdict(m['mixed16_speedup'] >= 2)})"
        )
        lines.append(
            f"- 64 adapters vs 1 at 2,048 tokens: {m['adapters64_s']:.2f} s vs {m['adapter1_s']:.2f} s → efficiency "
            f"**{m['adapters64_efficiency']:.2f}** (target ≥ 0.9: {verdict(m['adapters64_efficiency'] >= 0.9)})"
        )
        lines.append("")
    if "memory" in results:
        mem = results["memory"]
        lines += ["## 6. Memory of one training pass (peak RSS, fresh process each)", ""]
        lines += ["| case | peak GiB | pass GiB | RSS after GiB | seconds |", "|---|---|---|---|---|"]
        for case in MEMORY_CASES:
            r = mem[case]
            if "error" in r:
                lines.append(f"| {case} | {r['error']} | | | |")
            else:
                lines.append(
                    f"| {case} | {r['peak_gib']:.2f} | {r['pass_gib']:.2f} | {r['after_gib']:.2f} | {r['seconds']:.1f} |"
                )
        if "qwen3_4k_pass_ratio" in mem:
            ratio = mem["qwen3_4k_pass_ratio"]
            lines += ["", f"- 4k-token Qwen3-vocabulary pass, chunked ÷ materialised: **{ratio:.2f}x** "]
            lines[-1] += f"(target ≤ 0.3: {verdict(ratio <= 0.3)})"
        mixed = mem["smollm2_mixed_defaults"]
        if "peak_gib" in mixed:
            lines.append(
                f"- mixed-length SmolLM2 batch peak {mixed['peak_gib']:.2f} GiB (target ≤ 2.5 GiB for the whole "
                f"server: {verdict(mixed['peak_gib'] <= 2.5)}; this is the worker process alone)"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if "layer" in results:
        ax = axes[0]
        for rank, style in ((8, "-"), (32, "--")):
            rows = [r for r in results["layer"] if r["rank"] == rank]
            for key, label in (("loop", "per-adapter loop"), ("padded_bmm", "padded bmm"), ("loom", "Loom")):
                ax.plot([r["adapters"] for r in rows], [r[f"{key}_vs_base"] for r in rows], style, marker="o")
                ax.lines[-1].set_label(f"{label}, r={rank}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapters in the batch")
        ax.set_ylabel("time ÷ base matmul alone")
        ax.set_title("Mixed-adapter LoRA layer, forward + backward")
        ax.legend(fontsize=7)
    if "memory" in results:
        ax = axes[1]
        cases = [c for c in MEMORY_CASES if "peak_gib" in results["memory"][c]]
        ax.barh(cases, [results["memory"][c]["peak_gib"] for c in cases])
        ax.set_xlabel("peak RSS, GiB")
        ax.set_title("One training pass")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repetitions instead of 5")
    ap.add_argument("--only", default="layer,train,mixed,memory", help="comma-separated sections")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    reps = 2 if args.quick else 5
    sections = {
        "layer": lambda: layer_section(reps),
        "train": lambda: train_section(max(2, reps - 2)),
        "mixed": lambda: mixed_section(reps),
        "memory": memory_section,
    }
    results = {name: sections[name]() for name in args.only.split(",")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "perf_suite.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "perf_suite.md").write_text(report(results) + "\n")
    plot(results, RESULTS / "perf_suite.png")
    print(report(results))


if __name__ == "__main__":
    main()
