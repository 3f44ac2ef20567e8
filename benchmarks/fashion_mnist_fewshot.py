"""Few-shot Fashion-MNIST accuracy of a Qwen3-VL LoRA trained through Loom's API, with pixel baselines on the
same examples, in the shape of Tinker's Qwen3-VL-235B vs DINOv2 figure (accuracy against examples per class).

What it measures, all in one run:

1. VLM: for each k of `--shots` (default 1, 2, 4, 8, 16 examples per class), `examples/fashion_mnist_fewshot.py`'s
   pipeline through a real `loom serve` (started here on a free port in a temp data dir with only `--base-model`,
   stopped at the end): a fresh LoRA trained on the k x 10 chats, then each test image classified by the summed
   logprob of each of the ten answers (`compute_logprobs`). Also its wall time (training and scoring) and the
   server process's peak RSS during that k (VmHWM from /proc, reset per k through `clear_refs`).
2. Baselines on the very same training examples and test images: scikit-learn's `LogisticRegression` on the raw
   pixels (scaled to [0, 1]), and a small CNN (two 3x3 conv layers of 16 and 32 channels, each ReLU + 2x2 max
   pool, then one linear layer) trained full-batch with Adam for `--cnn-steps` steps, seeded. Both baselines
   are also scored on the whole t10k split (10,000 images), which shows how noisy the small shared subset is.

Writes `benchmarks/results/fashion_mnist_fewshot.{md,json,png}` (`--out-dir`): the table (k, accuracies, chance
0.10, VLM / logistic regression, wall seconds, peak RSS), the settings, and the plot (log2 x axis).

Limits: the default base model, `loom/tiny-qwen3-vl`, is a random-init miniature (2 text layers of width 128, a
2-block vision tower): it has no visual knowledge to transfer, so it sits near chance, and Tinker's published
advantage of a pretrained VLM over vision-only baselines cannot appear. The point is the pipeline; point
`--server` at a Loom serving a real Qwen3-VL (README.md, "Fashion-MNIST few-shot", for the hardware) to measure
that (the peak RSS column is then empty, and `--window` can batch more test images on a GPU). On this 2-core CPU machine one answer's score costs ~0.15-0.25 s (the server computes logits over the whole
151,936-token vocabulary at every position of each ~88-token sequence), so the test subset is small
(`--test-per-class`): one standard error of an accuracy on 40 images is 0.05 near chance and 0.08 near 0.5. No
thresholds.

    .venv/bin/python benchmarks/fashion_mnist_fewshot.py [--quick] [--shots 1,2,4,8,16] [--epochs 3]
        [--test-per-class 4] [--lr 3e-3] [--window 1] [--server URL (with LOOM_API_KEY) --base-model NAME]
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "0" if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" else "20000")  # as `loom`

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import loom  # noqa: E402
from examples.fashion_mnist_fewshot import FewShotConfig, load_split, per_class_indices, run_few_shot  # noqa: E402
from tests.e2e.server import LoomServer, free_port  # noqa: E402

TINY_VL = "loom/tiny-qwen3-vl"
CHANCE = 0.10
Split = tuple[np.ndarray, np.ndarray]


def pixels(images: np.ndarray) -> np.ndarray:
    """Images as rows of pixel values in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def logreg_accuracies(train: Split, tests: list[Split], seed: int) -> list[float]:
    """Multinomial logistic regression on raw pixels, fitted on `train`; its accuracy on each of `tests`."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=2000, random_state=seed).fit(pixels(train[0]), train[1])
    return [float(model.score(pixels(x), y)) for x, y in tests]


def cnn_accuracies(train: Split, tests: list[Split], steps: int, seed: int) -> list[float]:
    """The small CNN (module docstring) trained full-batch on `train`; its accuracy on each of `tests`."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )
    x, y = torch.from_numpy(pixels(train[0])).view(-1, 1, 28, 28), torch.from_numpy(train[1].astype(np.int64))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        return [
            float((net(torch.from_numpy(pixels(tx)).view(-1, 1, 28, 28)).argmax(1).numpy() == ty).mean())
            for tx, ty in tests
        ]


def reset_peak_rss(pid: int | None) -> None:
    """Restart the kernel's peak-RSS count of `pid` (a no-op where /proc refuses it)."""
    if pid is not None:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass


def peak_rss_mib(pid: int | None) -> float | None:
    """The peak RSS (VmHWM) of `pid` in MiB since its last reset, or None where it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text() if pid is not None else ""
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1024 if line else None


@contextmanager
def loom_service(args: argparse.Namespace):
    """A `loom.ServiceClient` of `--server`, or of a `loom serve` started here; yields it and the server's pid."""
    if args.server:
        service = loom.ServiceClient(base_url=args.server)
        try:
            yield service, None
        finally:
            service.close()
        return
    with tempfile.TemporaryDirectory(prefix="loom-bench-") as data_dir:
        server = LoomServer(Path(data_dir), free_port(), env_extra={"LOOM_BASE_MODELS": args.base_model})
        try:
            started = time.perf_counter()
            server.start(timeout=300)
            print(f"server up in {time.perf_counter() - started:.1f} s (pid {server.process.pid})", flush=True)
            service = loom.ServiceClient(base_url=server.url, api_key=server.api_key)
            try:
                yield service, server.process.pid
            finally:
                service.close()
        finally:
            server.stop()


def measure(service, pid, args, config, data) -> list[dict]:
    """One row per k: the VLM's and the baselines' accuracies on the same examples and test images."""
    (train_x, train_y), subset, full = data
    rows = []
    for k in args.shots:
        picked = per_class_indices(train_y, k, args.seed)
        train = (train_x[picked], train_y[picked])
        reset_peak_rss(pid)
        started = time.perf_counter()
        vlm, losses = run_few_shot(service, args.base_model, train, subset, config)
        row = {
            "k": k,
            "vlm": vlm,
            "vlm_seconds": time.perf_counter() - started,
            "server_peak_rss_mib": peak_rss_mib(pid),
            "vlm_loss_per_epoch": losses,
        }
        row["logreg"], row["logreg_full_t10k"] = logreg_accuracies(train, [subset, full], args.seed)
        row["cnn"], row["cnn_full_t10k"] = cnn_accuracies(train, [subset, full], args.cnn_steps, args.seed)
        print(
            f"k={k:>2}: VLM {vlm:.3f}  logreg {row['logreg']:.3f}  CNN {row['cnn']:.3f}  "
            f"({row['vlm_seconds']:.0f} s, loss/answer token {' '.join(f'{x:.2f}' for x in losses)})",
            flush=True,
        )
        rows.append(row)
    return rows


def ratio(a: float, b: float) -> str:
    """a / b to two decimals, "-" where b is 0."""
    return f"{a / b:.2f}" if b else "-"


def mib(value: float | None) -> str:
    """MiB with thousands separators, "-" where unknown."""
    return f"{value:,.0f}" if value is not None else "-"


def markdown(rows: list[dict], settings: dict) -> str:
    """The results file: the table of `rows` and the settings they were measured with."""
    n = settings["test_images"]
    lines = [
        "# Fashion-MNIST few-shot: Loom LoRA on a VLM vs pixel baselines",
        "",
        f"Written by `benchmarks/fashion_mnist_fewshot.py`; base model `{settings['base_model']}`; the same {n} "
        f"test images (t10k, {settings['test_per_class']} per class, seeded) for every column but the last two.",
        "",
        "| k (per class) | VLM acc | logreg acc | CNN acc | chance | VLM / logreg | VLM wall s | server peak RSS MiB "
        "| logreg acc, t10k | CNN acc, t10k |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['k']} | {r['vlm']:.3f} | {r['logreg']:.3f} | {r['cnn']:.3f} | {CHANCE:.2f} "
            f"| {ratio(r['vlm'], r['logreg'])} | {r['vlm_seconds']:.0f} | {mib(r['server_peak_rss_mib'])} "
            f"| {r['logreg_full_t10k']:.3f} | {r['cnn_full_t10k']:.3f} |"
            for r in rows
        ),
        "",
        "Settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()),
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], settings: dict, path: Path) -> None:
    """Accuracy against examples per class (log2 x axis), one line per method, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shots = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.plot(shots, [r["vlm"] for r in rows], "o-", label=f"Loom LoRA on {settings['base_model']}")
    ax.plot(shots, [r["logreg"] for r in rows], "s-", label="logistic regression (pixels)")
    ax.plot(shots, [r["cnn"] for r in rows], "^-", label="small CNN (pixels)")
    ax.axhline(CHANCE, color="grey", linestyle="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_ylim(0, 1)
    ax.set_xlabel("examples per class")
    ax.set_ylabel(f"accuracy ({settings['test_images']} test images)")
    ax.set_title("Fashion-MNIST few-shot classification")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(rows: list[dict], settings: dict, out_dir: Path) -> None:
    """`fashion_mnist_fewshot.md`, `.json` and `.png` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / "fashion_mnist_fewshot"
    stem.with_suffix(".md").write_text(markdown(rows, settings))
    stem.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    plot(rows, settings, stem.with_suffix(".png"))
    print(f"wrote {stem}.md, .json, .png")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shots", default="1,2,4,8,16", help="examples per class, comma separated")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--test-per-class", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3, help="3e-3 for the random-init miniature")
    parser.add_argument("--batch-size", type=int, default=FewShotConfig.batch_size)
    parser.add_argument("--rank", type=int, default=FewShotConfig.rank)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=FewShotConfig.window, help="test images scored at once")
    parser.add_argument("--cnn-steps", type=int, default=200)
    parser.add_argument("--base-model", default=TINY_VL)
    parser.add_argument("--server", help="use this Loom server (LOOM_API_KEY) instead of starting one")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="k in 1,2; 1 epoch; 2 test images per class")
    args = parser.parse_args()
    if args.quick:
        args.shots, args.epochs, args.test_per_class = "1,2", 1, 2
    args.shots = [int(k) for k in args.shots.split(",")]
    return args


def main() -> None:
    args = parse_args()
    config = FewShotConfig(args.epochs, args.batch_size, args.rank, args.lr, args.seed, args.window)
    train_x, train_y = load_split("train")
    full = load_split("t10k")
    tested = per_class_indices(full[1], args.test_per_class, args.seed + 1)
    subset = (full[0][tested], full[1][tested])
    settings = {
        "base_model": args.base_model,
        "shots": args.shots,
        "test_per_class": args.test_per_class,
        "test_images": len(tested),
        **asdict(config),
        "cnn_steps": args.cnn_steps,
        "cpus": os.cpu_count(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": round(os.getloadavg()[0], 2),
    }
    print("# fashion_mnist_fewshot: " + " ".join(f"{key}={value}" for key, value in settings.items()), flush=True)
    started = time.perf_counter()
    with loom_service(args) as (service, pid):
        rows = measure(service, pid, args, config, ((train_x, train_y), subset, full))
    settings["load_average_end"] = round(os.getloadavg()[0], 2)
    settings["total_seconds"] = round(time.perf_counter() - started)
    print(markdown(rows, settings))
    write_results(rows, settings, args.out_dir)


if __name__ == "__main__":
    main()
