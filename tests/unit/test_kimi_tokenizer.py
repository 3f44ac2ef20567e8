"""Kimi K2's tokenizer: the folder in Kimi's layout (tiktoken.model + tokenizer_config.json + tokenizer.json), the
server's tiktoken-backed `KimiTokenizer` loaded from it without the folder's code, and the fast tokenizer a client's
plain `AutoTokenizer` gets from the same folder, which must encode exactly as the server does."""

from __future__ import annotations

import gzip
import importlib.resources
import json
import random
import shutil
from pathlib import Path

import pytest
import tiktoken
from transformers import AutoTokenizer

from worker.models.bpe_ranks import parse_ranks, read_ranks
from worker.models.kimi_tokenizer import KimiTokenizer, is_kimi_folder, load_tokenizer
from worker.models.tokenizer_folders import chat_template, write_kimi_tokenizer

# Kimi-K2-Instruct's tokenizer_config.json `added_tokens_decoder`, written out here independently of the code.
PUBLISHED_IDS = {
    "[BOS]": 163584,
    "[EOS]": 163585,
    "<|im_end|>": 163586,
    "<|im_user|>": 163587,
    "<|im_assistant|>": 163588,
    "<|start_header_id|>": 163590,
    "<|end_header_id|>": 163591,
    "[EOT]": 163593,
    "<|im_system|>": 163594,
    "<|tool_calls_section_begin|>": 163595,
    "<|tool_calls_section_end|>": 163596,
    "<|tool_call_begin|>": 163597,
    "<|tool_call_argument_begin|>": 163598,
    "<|tool_call_end|>": 163599,
    "<|im_middle|>": 163601,
    "[UNK]": 163838,
    "[PAD]": 163839,
}
NOT_SPECIAL = {name for name in PUBLISHED_IDS if "tool_call" in name}
PAT_STR = "|".join(  # tokenization_kimi.py's pat_str, copied here so the test does not trust the code's copy
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "It's, I'm, you're, we've, they'll, she'd, DON'T, HE'S, O'Neill's",
    "中文分词测试：你好，世界！我们今天去北京。",
    "日本語のテキストとカタカナ、한국어 문장도 있습니다.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\nprint(fib(10))\n",
    'const x = {"a": [1, 2, 3], "b": null}; // comment\n\tif (x.a.length >= 3) { return x?.b ?? 0; }',
    "0 12 345 6789 1234567890 3.14159 -42 1,000,000 2025-08-11",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs, newlines\n\n\nand windows\r\n\r\nline ends",
    "\n \n  \n   ",
    "emoji 😀🎉👍🏽👨‍👩‍👧 flags 🇫🇷🇯🇵 and ✨",
    "Ελληνικά, кириллица, עברית, العربية, हिन्दी, ไทย",
    "combining e\u0301 and precomposed é, ﬁ ligature, ℃ Ω",
    "CamelCaseWords HTTPServer getHTTPResponseCode XMLHttpRequest",
    "URL https://example.com/path?q=1&r=two#frag and e-mail a.b@c.de",
    "x" * 3000,
    "ab " * 700,
]


def _published_encoding() -> tiktoken.Encoding:
    """The tiktoken encoding the tiny folder must match: o200k_base's first 163,584 ranks, Kimi's regex, and the
    256 specials at Kimi's ids (named ones from the published config, the rest reserved)."""
    packed = importlib.resources.files("bpe_openai.data") / "o200k_base.tiktoken.gz"
    ranks = {t: r for t, r in parse_ranks(gzip.decompress(packed.read_bytes())).items() if r < 163584}
    names = {i: name for name, i in PUBLISHED_IDS.items()}
    specials = {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(163584, 163840)}
    return tiktoken.Encoding("kimi-test", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module")
def server(tiny_kimi_folder: Path) -> KimiTokenizer:
    return load_tokenizer(tiny_kimi_folder)


@pytest.fixture(scope="module")
def client(tiny_kimi_folder: Path):
    return AutoTokenizer.from_pretrained(str(tiny_kimi_folder))


def test_the_folder_has_kimis_layout_and_published_special_ids(tiny_kimi_folder: Path) -> None:
    assert {p.name for p in tiny_kimi_folder.iterdir()} == {"tiktoken.model", "tokenizer_config.json", "tokenizer.json"}
    ranks = read_ranks(tiny_kimi_folder / "tiktoken.model")
    assert sorted(ranks.values()) == list(range(163584))
    assert all(bytes([b]) in ranks for b in range(256))
    config = json.loads((tiny_kimi_folder / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert {entry["content"]: int(i) for i, entry in decoder.items()} == PUBLISHED_IDS
    assert {entry["content"] for entry in decoder.values() if not entry["special"]} == NOT_SPECIAL
    assert config["tokenizer_class"] == "TikTokenTokenizer" and "auto_map" not in config
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]) == (
        "[BOS]",
        "[EOS]",
        "[UNK]",
        "[PAD]",
    )
    assert config["chat_template"] == chat_template("kimi_k2")


def test_the_server_loads_the_folder_as_kimis_tokenizer(server: KimiTokenizer) -> None:
    assert isinstance(server, KimiTokenizer) and not server.is_fast
    assert len(server) == 163840
    assert (server.bos_token_id, server.eos_token_id, server.unk_token_id, server.pad_token_id) == (
        163584,
        163585,
        163838,
        163839,
    )
    for name, i in PUBLISHED_IDS.items():
        assert server.encode(name, add_special_tokens=False) == [i]
        assert server.convert_ids_to_tokens(i) == name
    assert server.encode("<|reserved_token_163600|>", add_special_tokens=False) == [163600]
    assert server.chat_template == chat_template("kimi_k2")


def test_the_server_encodes_as_tiktoken_and_the_client_as_the_server(server, client) -> None:
    reference = _published_encoding()
    assert client.is_fast and len(client) == 163840
    specials = " ".join(f"{name}x" for name in PUBLISHED_IDS) + "<|reserved_token_163589|>\n<|reserved_token_163700|>"
    for text in [*CORPUS, specials]:
        expected = reference.encode(text, allowed_special="all")
        assert server.encode(text, add_special_tokens=False) == expected, text[:40]
        assert client.encode(text, add_special_tokens=False) == expected, text[:40]


def test_random_text_encodes_alike_on_server_and_client(server, client) -> None:
    rng = random.Random(20250811)
    alphabet = "aAzZ09 \t\n\r'.,;:!?-_()[]{}<>|\"/\\éÉßøΩπжЖ中文字日本한😀🎉\u0301\u200d" + "<|im_end|>"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        assert server.encode(text, add_special_tokens=False) == client.encode(text, add_special_tokens=False), text


def test_decode_round_trips_and_skips_only_special_tokens(server, client) -> None:
    for text in CORPUS:
        assert server.decode(server.encode(text, add_special_tokens=False)) == text
    ids = server.encode("[BOS]call<|tool_call_begin|>f:0<|tool_call_end|>done<|im_end|>[EOS]", add_special_tokens=False)
    assert server.decode(ids, skip_special_tokens=True) == "call<|tool_call_begin|>f:0<|tool_call_end|>done"
    assert client.decode(ids, skip_special_tokens=True) == server.decode(ids, skip_special_tokens=True)
    assert server.decode([163586], skip_special_tokens=False) == "<|im_end|>"


def test_very_long_runs_are_encoded_in_slices_and_decode_back(server) -> None:
    text = "a" * 60_000 + " " * 30_000 + "b"
    ids = server.encode(text, add_special_tokens=False)
    assert server.decode(ids) == text


def test_apply_chat_template_returns_what_transformers_returns(server, client) -> None:
    messages = [{"role": "user", "content": "Hi there"}]
    text = server.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = server.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert encoded["input_ids"] == server.encode(text, add_special_tokens=False)
    assert encoded["input_ids"] == client.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def test_load_tokenizer_recognises_kimi_folders_by_class_or_auto_map(tiny_kimi_folder: Path, tmp_path: Path) -> None:
    assert is_kimi_folder(tiny_kimi_folder)
    config = json.loads((tiny_kimi_folder / "tokenizer_config.json").read_text())
    shipped = tmp_path / "shipped"  # as moonshotai/Kimi-K2-Instruct ships: auto_map, no tokenizer.json
    shipped.mkdir()
    shutil.copy(tiny_kimi_folder / "tiktoken.model", shipped)
    del config["tokenizer_class"]
    config["auto_map"] = {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}
    (shipped / "tokenizer_config.json").write_text(json.dumps(config))
    (shipped / "tokenization_kimi.py").write_text("raise RuntimeError('the folder code must never run')\n")
    assert is_kimi_folder(shipped)
    tokenizer = load_tokenizer(shipped)
    assert isinstance(tokenizer, KimiTokenizer) and tokenizer.encode("<|im_end|>", add_special_tokens=False) == [163586]
    (shipped / "tiktoken.model").unlink()
    assert not is_kimi_folder(shipped)


def test_the_writer_takes_exactly_kimis_rank_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="163584"):
        write_kimi_tokenizer(tmp_path, {bytes([b]): b for b in range(256)})
