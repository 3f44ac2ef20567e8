"""Decode throughput of the multi-LoRA sampler, with same-run baselines.

Three measurements on the same prompts (8 prompts × `--prompt-len` tokens, greedy, `--new` new tokens each):

1. mixed: 8 requests, each through its own LoRA adapter (rank 8), in one continuous batch;
2. single: the same 8 requests all through ONE adapter — the ratio mixed / single is the cost of mixing
   adapters in a decode step (target ≥ 0.8);
3. transformers: `model.generate` on the bare base model (batch of 8, left padding, greedy, KV cache) versus our
   sampler on the bare base model (slot None) — the ratio ours / HF is the cost of our decode loop.

Each figure is the median of `--repeats` runs after a warm-up; tokens/s counts generated tokens only.

Limits: CPU float32; all rows generate exactly `--new` tokens (EOS disabled) so every variant does equal work.

    .venv/bin/python benchmarks/sampling_throughput.py [--quick] [--model smollm2|tiny-kimi-k2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from contract.catalogue import SMOLLM2, TINY_KIMI_K2
from contract.settings import Settings
from worker.lora.adapter import LoraSpec, create_adapter
from worker.models.loader import load_base_model
from worker.sampler import SampleWork, run_sampling

MODELS = {"smollm2": SMOLLM2, "tiny-kimi-k2": TINY_KIMI_K2}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.new, args.repeats = 16, 1

    lm = load_base_model(MODELS[args.model], Settings().model_cache_dir)
    gen = torch.Generator().manual_seed(0)
    slots = []
    for i in range(8):
        adapter = create_adapter(lm.targets, LoraSpec(8, i, True, True, False))
        for _, b in adapter.params.values():
            with torch.no_grad():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
        lm.router.adapters[100 + i] = adapter
        slots.append(100 + i)
    prompts = [torch.randint(100, 5000, (args.prompt_len,), generator=gen).tolist() for _ in range(8)]

    def works(slot_of) -> list[SampleWork]:
        return [
            SampleWork(slot=slot_of(i), prompt=p, max_tokens=args.new, temperature=0.0, stop_at_eos=False)
            for i, p in enumerate(prompts)
        ]

    tokens = 8 * args.new
    mixed = timed(lambda: run_sampling(lm, works(lambda i: slots[i])), args.repeats)
    single = timed(lambda: run_sampling(lm, works(lambda i: slots[0])), args.repeats)
    ours_base = timed(lambda: run_sampling(lm, works(lambda i: None)), args.repeats)

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def hf_generate() -> None:
        with torch.no_grad():
            lm.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                pad_token_id=0,
            )

    hf = timed(hf_generate, args.repeats)
    print(f"model {lm.spec.name}, 8 prompts x {args.prompt_len} tokens, {args.new} new tokens each, greedy")
    print(f"{'variant':<34}{'seconds':>10}{'tokens/s':>12}")
    for name, secs in [
        ("8 adapters mixed", mixed),
        ("1 adapter (same total tokens)", single),
        ("ours, base model", ours_base),
        ("transformers generate, base", hf),
    ]:
        print(f"{name:<34}{secs:>10.3f}{tokens / secs:>12.1f}")
    print(f"mixed / single adapter throughput: {single / mixed:.3f}  (target >= 0.8)")
    print(f"ours / transformers.generate throughput: {hf / ours_base:.3f}")


if __name__ == "__main__":
    main()
