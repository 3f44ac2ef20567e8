"""Kimi K2's tokenizer as it ships, without running the model folder's code; and `load_tokenizer`, which picks it
for a Kimi folder and `AutoTokenizer` for any other.

A Kimi K2 folder (moonshotai/Kimi-K2-Instruct) holds `tiktoken.model` (163,584 BPE ranks), `tokenization_kimi.py`
(its `TikTokenTokenizer`, named in `tokenizer_config.json`'s `tokenizer_class` / `auto_map`) and
`tokenizer_config.json`, whose `added_tokens_decoder` names some of the 256 special ids that follow the ranks
(`[BOS]` 163584, `[EOS]` 163585, `<|im_end|>` 163586, ...; the unnamed ones are `<|reserved_token_{id}|>`).
`KimiTokenizer` rebuilds that tokenizer from those files: a `tiktoken.Encoding` of the ranks, the specials and
Kimi's pre-tokenizer regex (`KIMI_PAT_STR`), behind transformers' slow-tokenizer API (`encode`, `decode`,
`convert_ids_to_tokens`, `apply_chat_template` with the folder's chat template, `len`). Like Kimi's class it
encodes special-token text found in the input as those tokens (all 256, named or reserved), and feeds tiktoken
slices of at most 25,000 consecutive whitespace or non-whitespace characters.

Limits: reads the template and special tokens the folder declares; `tokenization_kimi.py` is never imported.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from shutil import copyfile
from typing import Any

import tiktoken
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.tokenization_python import PythonBackend

from worker.models.bpe_ranks import read_ranks

KIMI_PAT_STR = "|".join(
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
"""The pre-tokenizer regex of Kimi's `tokenization_kimi.py` (`TikTokenTokenizer.pat_str`)."""

KIMI_RANKS = 163_584
KIMI_RESERVED_SPECIALS = 256
"""Special ids after the ranks: 163,584 + 256 = Kimi K2's vocabulary of 163,840."""

KIMI_ADDED_TOKENS: dict[int, tuple[str, bool]] = {
    163584: ("[BOS]", True),
    163585: ("[EOS]", True),
    163586: ("<|im_end|>", True),
    163587: ("<|im_user|>", True),
    163588: ("<|im_assistant|>", True),
    163590: ("<|start_header_id|>", True),
    163591: ("<|end_header_id|>", True),
    163593: ("[EOT]", True),
    163594: ("<|im_system|>", True),
    163595: ("<|tool_calls_section_begin|>", False),
    163596: ("<|tool_calls_section_end|>", False),
    163597: ("<|tool_call_begin|>", False),
    163598: ("<|tool_call_argument_begin|>", False),
    163599: ("<|tool_call_end|>", False),
    163601: ("<|im_middle|>", True),
    163838: ("[UNK]", True),
    163839: ("[PAD]", True),
}
"""Kimi-K2-Instruct's `added_tokens_decoder`: id -> (content, special). Tool-call markers are not special, so
decoding with `skip_special_tokens=True` keeps them for the tool-call parser."""

KIMI_EXTRA_SPECIALS = (
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|im_middle|>",
)
"""`additional_special_tokens` of Kimi's tokenizer (skipped by `decode(skip_special_tokens=True)`)."""

_MAX_CHARS = 400_000
_MAX_RUN = 25_000


def kimi_special_tokens(named: Mapping[int, str], n_ranks: int) -> dict[str, int]:
    """All 256 special tokens after `n_ranks` ranks: the `named` ones, the rest `<|reserved_token_{id}|>`."""
    ids = range(n_ranks, n_ranks + KIMI_RESERVED_SPECIALS)
    return {named.get(i, f"<|reserved_token_{i}|>"): i for i in ids}


def _slices(text: str) -> Iterator[str]:
    """`text` in pieces of at most 400,000 characters, each cut so that no run of whitespace or of non-whitespace
    is longer than 25,000 characters (what Kimi's tokenizer hands tiktoken)."""
    for chunk_start in range(0, len(text), _MAX_CHARS):
        chunk = text[chunk_start : chunk_start + _MAX_CHARS]
        start, run, space = 0, 0, chunk[:1].isspace()
        for i, char in enumerate(chunk):
            if char.isspace() != space:
                space, run = not space, 1
                continue
            run += 1
            if run > _MAX_RUN:
                yield chunk[start:i]
                start, run = i, 1
        yield chunk[start:]


class KimiTokenizer(PythonBackend):
    """Kimi K2's tiktoken tokenizer as a transformers slow tokenizer (see the module docstring)."""

    vocab_files_names = {"vocab_file": "tiktoken.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        bos_token: str = "[BOS]",
        eos_token: str = "[EOS]",
        unk_token: str | None = None,
        pad_token: str | None = None,
        additional_special_tokens: list[str] | None = None,
        added_tokens_decoder: Mapping[int, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_file = vocab_file
        ranks = read_ranks(Path(vocab_file))
        named = {int(i): str(token) for i, token in (added_tokens_decoder or {}).items()}
        self.encoding = tiktoken.Encoding(
            name=Path(vocab_file).name,
            pat_str=KIMI_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=kimi_special_tokens(named, len(ranks)),
        )
        byte_char = bytes_to_unicode()
        self._byte_of = {char: byte for byte, char in byte_char.items()}
        self._pieces = [
            "".join(byte_char[b] for b in self.encoding.decode_single_token_bytes(i))
            for i in range(self.encoding.n_vocab)
        ]
        self._ids = {piece: i for i, piece in enumerate(self._pieces)}
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            additional_special_tokens=list(KIMI_EXTRA_SPECIALS)
            if additional_special_tokens is None
            else additional_special_tokens,
            added_tokens_decoder=dict(added_tokens_decoder or {}),
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def get_vocab(self) -> dict[str, int]:
        return self._ids

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [self._pieces[i] for piece in _slices(text) for i in self.encoding.encode(piece, allowed_special="all")]

    def _convert_token_to_id(self, token: str) -> int | None:
        return self._ids.get(token, self.unk_token_id)

    def _convert_id_to_token(self, index: int) -> str:
        return self._pieces[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return bytes(self._byte_of[char] for char in "".join(tokens)).decode("utf-8", "replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        name = (f"{filename_prefix}-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        target = Path(save_directory) / name
        if target.resolve() != Path(self.vocab_file).resolve():
            copyfile(self.vocab_file, target)
        return (str(target),)


def is_kimi_folder(folder: Path) -> bool:
    """A folder with `tiktoken.model` whose `tokenizer_config.json` names Kimi's `TikTokenTokenizer`."""
    config_path = folder / "tokenizer_config.json"
    if not (folder / "tiktoken.model").is_file() or not config_path.is_file():
        return False
    config = json.loads(config_path.read_text())
    auto = (config.get("auto_map") or {}).get("AutoTokenizer") or []
    named = [auto] if isinstance(auto, str) else [entry for entry in auto if isinstance(entry, str)]
    return config.get("tokenizer_class") == "TikTokenTokenizer" or "tokenization_kimi.TikTokenTokenizer" in named


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder: `KimiTokenizer` for a Kimi K2 folder, `AutoTokenizer` otherwise (never
    with `trust_remote_code`)."""
    if is_kimi_folder(folder):
        return KimiTokenizer.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))
