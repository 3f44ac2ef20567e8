"""Streaming text: deltas always concatenate to the final text, which ends before the first stop string; a
suffix that may grow into a stop string, or an incomplete UTF-8 character, is held back until it resolves."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from contract.catalogue import SMOLLM2
from tests.unit.worker_fixtures import MODEL_CACHE
from worker.models.registry import model_dir
from worker.text_stream import TextStream


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(model_dir(SMOLLM2, MODEL_CACHE)))


def run(tokenizer, text: str, stops: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stops)
    deltas = [stream.push(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    deltas.append(stream.finish())
    return deltas, stream


def test_deltas_reassemble_without_stops(tokenizer) -> None:
    text = "Hello world, ünïcödé and emoji 🙂 work."
    deltas, stream = run(tokenizer, text, [])
    assert "".join(deltas) == stream.text == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_is_cut_and_never_leaked(tokenizer) -> None:
    deltas, stream = run(tokenizer, "one, two, three, four", [", thr"])
    assert stream.text == "one, two" and stream.stopped
    assert "".join(deltas) == "one, two"


def test_possible_stop_prefix_is_held_then_released(tokenizer) -> None:
    stream = TextStream(tokenizer, ["END"])
    held = "".join(stream.push(t) for t in tokenizer.encode("The E", add_special_tokens=False))
    assert held == "The "  # "E" could start "END": not sent yet
    released = "".join(stream.push(t) for t in tokenizer.encode(" is not an END", add_special_tokens=False))
    assert held + released + stream.finish() == "The E is not an "
