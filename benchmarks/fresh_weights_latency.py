"""Time from `save_weights_for_sampler` returning to the first token sampled from those new weights.

Starts a real `loom serve` (tiny Kimi K2 only) and drives it with the official `tinker` SDK. Each iteration
takes an optimizer step (so the weights really change), calls `save_weights_and_get_sampling_client()`, and
times, from the moment that call returns, a one-token `sample` on the new snapshot ("fresh"). Baseline in the
same run: the same one-token sample repeated on that snapshot right after ("warm"), i.e. the plain request
round trip. fresh - warm is what serving brand-new weights costs. Target: fresh p50 < 100 ms.

Limits: loopback on a shared 2-core machine; tiny model, so the figure is protocol + queue + snapshot overhead.

    .venv/bin/python benchmarks/fresh_weights_latency.py [--quick] [--n 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.server import LoomServer, free_port  # noqa: E402

KIMI = "loom/tiny-kimi-k2"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 5 if args.quick else args.n
    with tempfile.TemporaryDirectory() as data_dir:
        server = LoomServer(Path(data_dir), free_port(), env_extra={"LOOM_BASE_MODELS": KIMI}).start()
        try:
            os.environ["TINKER_BASE_URL"], os.environ["TINKER_API_KEY"] = server.url, server.api_key
            import tinker
            from tinker import types

            training = tinker.ServiceClient().create_lora_training_client(base_model=KIMI, rank=8).result()
            datum = types.Datum(
                model_input=types.ModelInput.from_ints(list(range(100, 120))),
                loss_fn_inputs={"target_tokens": list(range(101, 121))},
            )
            prompt = types.ModelInput.from_ints(list(range(200, 216)))
            params = types.SamplingParams(max_tokens=1, temperature=0.0)
            fresh, warm = [], []
            for i in range(n + 1):
                training.forward_backward([datum], "cross_entropy")
                training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
                sampler = training.save_weights_and_get_sampling_client().result()
                start = time.perf_counter()
                sampler.sample(prompt, 1, params).result()
                middle = time.perf_counter()
                sampler.sample(prompt, 1, params).result()
                end = time.perf_counter()
                if i:  # the first iteration warms up connections and code paths
                    fresh.append((middle - start) * 1000)
                    warm.append((end - middle) * 1000)
        finally:
            server.stop()
    p50f, p50w = statistics.median(fresh), statistics.median(warm)
    print(f"{n} snapshots of a tiny Kimi K2 LoRA (rank 8), one-token samples, milliseconds")
    print(f"{'':<32}{'p50':>8}{'max':>8}")
    print(f"{'fresh weights (after save)':<32}{p50f:>8.1f}{max(fresh):>8.1f}")
    print(f"{'warm snapshot (baseline)':<32}{p50w:>8.1f}{max(warm):>8.1f}")
    print(
        f"fresh / warm p50: {p50f / p50w:.2f}; added by new weights: {p50f - p50w:.1f} ms (target fresh p50 < 100 ms)"
    )


if __name__ == "__main__":
    main()
