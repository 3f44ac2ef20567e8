"""Few-shot image classification on real Fashion-MNIST with a Qwen3-VL LoRA trained through Loom's API.

    apt-get install dataset-fashion-mnist   # Debian: the four idx files under /usr/share/datasets/fashion-mnist
    export LOOM_BASE_URL=http://127.0.0.1:8000 LOOM_API_KEY=tml-...   # printed by `loom serve`
    python examples/fashion_mnist_fewshot.py --shots 4 [--base-model Qwen/Qwen3-VL-30B-A3B-Instruct] \\
        [--epochs 4] [--test-per-class 20] [--rank 8] [--lr 5e-4] [--batch-size 10] [--window 1]

What it does, with Loom's own SDK (`loom`, `loom.vision`):

1. picks `--shots` training images per class from the train split (seeded, nested: the first k of a fixed
   per-class permutation, so 1 shot is a subset of 2) and a balanced, seeded test subset of the t10k split;
2. turns each training image into a Qwen3-VL chat, user: image + "What is this item of clothing? Answer with one
   word.", assistant: the class name (`CLASSES`), and trains a LoRA with cross-entropy on the answer tokens only,
   `--epochs` passes over the shuffled examples in batches of `--batch-size`, one Adam step per batch; every
   batch's forward_backward and optim_step is submitted before any is waited on (the server runs them in order);
3. snapshots the weights for sampling and classifies each test image by scoring all ten answers: the sum of the
   answer tokens' logprobs (`compute_logprobs`, the `<|im_end|>` that closes the answer included), argmax. The
   ten requests of up to `window` images are in flight at once, so the server can batch them.

Prints the per-epoch loss per answer token and the test accuracy (chance: 0.10). The default `--lr` 5e-4 is what
Tinker's LoRA learning-rate formula, 5e-4 * (2000 / hidden size)^0.0775 for Qwen, gives the real Qwen3-VL-30B-A3B
and -235B-A22B (hidden size 2048 and 4096); the random-init `loom/tiny-qwen3-vl` learns its answers at ~3e-3.

Limits: the images are the 28x28 originals; Qwen3-VL's image processor upscales them (64 image tokens each with
the published geometry). The label words are one lower-case word each (`T-shirt` keeps its capital); a real
model's accuracy depends on them. No validation split, no early stopping: a sketch of the pipeline, not a tuned
recipe. `benchmarks/fashion_mnist_fewshot.py` runs it at 1-16 shots against pixel baselines.
"""

from __future__ import annotations

import argparse
import gzip
import random
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import loom
from loom import types
from loom.vision import chat_input, completion_datum

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
"""Fashion-MNIST's ten labels in label order, each as the one-word answer the model is taught."""
QUESTION = "What is this item of clothing? Answer with one word."
END = "<|im_end|>"


@dataclass(frozen=True)
class FewShotConfig:
    """How one few-shot LoRA run trains and is scored."""

    epochs: int = 4
    batch_size: int = 10
    rank: int = 8
    lr: float = 5e-4
    seed: int = 0
    window: int = 1
    """Test images whose ten scoring requests are in flight at once: 1 is fastest on a 2-core CPU server (a batch
    of 10 x ~88 positions already takes ~0.5 GB of logits over the 151,936-token vocabulary); raise it on a GPU."""


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) of unsigned bytes as an array of its declared shape."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
        data = file.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, 28, 28] uint8 and labels [n] of the `train` or `t10k` split."""
    images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def per_class_indices(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The first `k` indices of each class in a seeded permutation, class by class (so k=1 is inside k=2)."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in range(len(CLASSES))]
    if any(len(p) < k for p in picks):
        raise ValueError(f"some class has fewer than {k} examples")
    return np.concatenate(picks)


def question(tokenizer, image: np.ndarray) -> types.ModelInput:
    """The chat prompt asking what the 28x28 grey image shows, ending where the assistant answers."""
    content = [{"type": "image", "image": Image.fromarray(image).convert("RGB")}, {"type": "text", "text": QUESTION}]
    return chat_input(tokenizer, [{"role": "user", "content": content}])


def answer_tokens(tokenizer, label: int) -> list[int]:
    """The answer naming class `label`, closed by the end-of-turn token."""
    return list(tokenizer.encode(CLASSES[label] + END, add_special_tokens=False))


def training_data(tokenizer, images: np.ndarray, labels: np.ndarray) -> list[types.Datum]:
    """One cross-entropy datum per image, the loss on its answer only."""
    return [
        completion_datum(question(tokenizer, im), answer_tokens(tokenizer, int(y))) for im, y in zip(images, labels)
    ]


def train(training: loom.TrainingClient, data: Sequence[types.Datum], config: FewShotConfig) -> list[float]:
    """`config.epochs` shuffled passes, one Adam step per batch; the loss per answer token of each epoch."""
    order, rng, adam = list(range(len(data))), random.Random(config.seed), types.AdamParams(learning_rate=config.lr)
    answer = sum(sum(d.loss_fn_inputs["weights"].data) for d in data)
    losses = []
    for _ in range(config.epochs):
        rng.shuffle(order)
        batches = [[data[i] for i in order[s : s + config.batch_size]] for s in range(0, len(order), config.batch_size)]
        steps = [(training.forward_backward(b, "cross_entropy"), training.optim_step(adam)) for b in batches]
        losses.append(sum(fb.result().metrics["loss:sum"] for fb, _ in steps) / answer)
        steps[-1][1].result()
    return losses


def answer_scores(
    sampler: loom.SamplingClient, prompts: Sequence[types.ModelInput], answers: Sequence[list[int]], window: int
) -> np.ndarray:
    """[len(prompts), len(answers)]: the summed logprob of each answer after each prompt, `window` prompts in flight."""
    scores = np.zeros((len(prompts), len(answers)))
    pending: list[tuple[int, list[loom.APIFuture]]] = []

    def collect(row: int, futures: list[loom.APIFuture]) -> None:
        for col, (future, answer) in enumerate(zip(futures, answers)):
            scores[row, col] = sum(future.result()[-len(answer) :])

    for row, prompt in enumerate(prompts):
        pending.append(
            (row, [sampler.compute_logprobs(prompt.append(types.EncodedTextChunk(tokens=a))) for a in answers])
        )
        if len(pending) >= window:
            collect(*pending.pop(0))
    for item in pending:
        collect(*item)
    return scores


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """The share of rows whose best-scored answer is the true label."""
    return float(np.mean(scores.argmax(axis=1) == labels))


def run_few_shot(
    service: loom.ServiceClient,
    base_model: str,
    train_set: tuple[np.ndarray, np.ndarray],
    test_set: tuple[np.ndarray, np.ndarray],
    config: FewShotConfig,
) -> tuple[float, list[float]]:
    """Train a fresh LoRA on `train_set`, score `test_set`; the test accuracy and the per-epoch losses."""
    training = service.create_lora_training_client(base_model, rank=config.rank, seed=config.seed)
    tokenizer = training.get_tokenizer()
    losses = train(training, training_data(tokenizer, *train_set), config)
    sampler = training.save_weights_and_get_sampling_client()
    prompts = [question(tokenizer, image) for image in test_set[0]]
    answers = [answer_tokens(tokenizer, label) for label in range(len(CLASSES))]
    return accuracy(answer_scores(sampler, prompts, answers, config.window), test_set[1]), losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-model", default="loom/tiny-qwen3-vl")
    parser.add_argument("--shots", type=int, default=4, help="training examples per class")
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=FewShotConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=FewShotConfig.batch_size)
    parser.add_argument("--rank", type=int, default=FewShotConfig.rank)
    parser.add_argument("--lr", type=float, default=FewShotConfig.lr)
    parser.add_argument("--seed", type=int, default=FewShotConfig.seed)
    parser.add_argument("--window", type=int, default=FewShotConfig.window, help="test images scored at once")
    args = parser.parse_args()
    config = FewShotConfig(args.epochs, args.batch_size, args.rank, args.lr, args.seed, args.window)

    train_images, train_labels = load_split("train")
    test_images, test_labels = load_split("t10k")
    picked = per_class_indices(train_labels, args.shots, args.seed)
    tested = per_class_indices(test_labels, args.test_per_class, args.seed + 1)
    start, service = time.perf_counter(), loom.ServiceClient()
    try:
        acc, losses = run_few_shot(
            service,
            args.base_model,
            (train_images[picked], train_labels[picked]),
            (test_images[tested], test_labels[tested]),
            config,
        )
    finally:
        service.close()
    print("loss per answer token by epoch: " + " ".join(f"{x:.3f}" for x in losses))
    print(f"{args.base_model}: {args.shots} shots/class, accuracy {acc:.3f} on {len(tested)} test images (chance 0.10)")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
