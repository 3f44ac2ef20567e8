"""`examples/fashion_mnist_fewshot.py`'s data side: the idx reader on a file written here and on the real
Fashion-MNIST (the Debian package `dataset-fashion-mnist`; those tests skip where it is not installed), the seeded,
nested, per-class few-shot selection, and the training datums built with Qwen3's real tokenizer: inputs as long as
their targets, the loss on the answer and its `<|im_end|>` only, each image 64 tokens."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from examples.fashion_mnist_fewshot import (
    CLASSES,
    DATA_DIR,
    answer_tokens,
    load_split,
    per_class_indices,
    question,
    read_idx,
    training_data,
)
from loom.tokenizers import load_tokenizer

needs_data = pytest.mark.skipif(
    not (DATA_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
    reason=f"Fashion-MNIST is not installed under {DATA_DIR} (apt-get install dataset-fashion-mnist)",
)


def test_read_idx_reads_the_declared_shape_and_refuses_other_files(tmp_path: Path) -> None:
    values = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">HBB3I", 0, 0x08, 3, 2, 3, 4) + values.tobytes()))
    assert np.array_equal(read_idx(path), values)
    floats = tmp_path / "floats-idx1-ubyte"
    floats.write_bytes(struct.pack(">HBBI", 0, 0x0D, 1, 1) + b"\0\0\0\0")
    with pytest.raises(ValueError, match="not an idx file of unsigned bytes"):
        read_idx(floats)


@needs_data
def test_the_real_splits_have_fashion_mnist_shapes_and_balanced_labels() -> None:
    for split, n in (("train", 60_000), ("t10k", 10_000)):
        images, labels = load_split(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8 and images.max() > 200
        assert np.array_equal(np.bincount(labels), [n // 10] * 10)


@needs_data
def test_few_shot_selection_is_seeded_balanced_and_nested() -> None:
    _, labels = load_split("t10k")
    two = per_class_indices(labels, 2, seed=0)
    assert np.array_equal(labels[two], np.repeat(np.arange(10), 2))
    assert np.array_equal(two, per_class_indices(labels, 2, seed=0))
    assert set(per_class_indices(labels, 1, seed=0)) <= set(two)
    assert not np.array_equal(two, per_class_indices(labels, 2, seed=1))
    with pytest.raises(ValueError, match="fewer than 1001"):
        per_class_indices(labels, 1001, seed=0)


def test_training_datums_teach_the_answer_after_a_64_token_image(qwen3_folder: Path) -> None:
    tokenizer = load_tokenizer(qwen3_folder)
    images = np.random.default_rng(0).integers(0, 256, (len(CLASSES), 28, 28), dtype=np.uint8)
    labels = np.arange(len(CLASSES))
    prompt = question(tokenizer, images[0])
    assert [c.expected_tokens for c in prompt.chunks if c.type == "image"] == [64]
    assert tokenizer.decode(prompt.chunks[-1].tokens).endswith("<|im_end|>\n<|im_start|>assistant\n")
    for datum, label in zip(training_data(tokenizer, images, labels), labels):
        targets, weights = datum.loss_fn_inputs["target_tokens"].data, datum.loss_fn_inputs["weights"].data
        answer = answer_tokens(tokenizer, int(label))
        assert datum.model_input.length == len(targets) == len(weights) == prompt.length + len(answer) - 1
        taught = [t for t, w in zip(targets, weights) if w == 1.0]
        assert taught == answer == targets[-len(answer) :]
        assert tokenizer.decode(taught) == CLASSES[label] + "<|im_end|>"
