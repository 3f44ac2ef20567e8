"""tiktoken BPE rank files (Kimi's `tiktoken.model`, Qwen's `qwen.tiktoken`): reading, writing, and converting
them into a Hugging Face fast tokenizer that encodes exactly as tiktoken does.

A rank file holds one `base64(token bytes) rank` line per token, ranks dense from 0; rank order is merge order, so
any prefix of a rank file is itself a valid BPE. `fast_tokenizer` builds the `tokenizers.Tokenizer` with
transformers' `TikTokenConverter` (byte-level BPE whose merges are recovered from the ranks, split first by the
model's pre-tokenizer regex); added tokens take the ids that follow the ranks, in the order given.

Limits: rank files are parsed here rather than with `tiktoken.load.load_tiktoken_bpe`, which caches every file it
reads by its path under the system temp folder (a file rewritten at the same path would read stale).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers
from transformers.convert_slow_tokenizer import TikTokenConverter


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """The ranks of a rank file's bytes."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def read_ranks(path: Path) -> dict[bytes, int]:
    return parse_ranks(path.read_bytes())


def write_ranks(path: Path, ranks: Mapping[bytes, int]) -> None:
    """Write `ranks` (dense from 0, checked) as a rank file, in rank order."""
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    if [rank for _, rank in ordered] != list(range(len(ordered))):
        raise ValueError("BPE ranks must be dense from 0")
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ordered))


class _RanksConverter(TikTokenConverter):
    """`TikTokenConverter` fed ranks already in memory instead of a file path."""

    def __init__(self, ranks: Mapping[bytes, int], pattern: str) -> None:
        super().__init__(vocab_file=None, pattern=pattern)
        self.ranks = dict(ranks)

    def load_tiktoken_bpe(self, tiktoken_url: str | None) -> dict[bytes, int]:
        return self.ranks


def fast_tokenizer(
    ranks: Mapping[bytes, int], pattern: str, added: Sequence[AddedToken], nfc: bool = False
) -> Tokenizer:
    """The byte-level BPE `tokenizers.Tokenizer` of `ranks` split by `pattern`, with `added` at ids
    `len(ranks)`, `len(ranks) + 1`, ...; `nfc` normalises text to NFC first (as Qwen's tokenizer does)."""
    tokenizer = _RanksConverter(ranks, pattern).converted()
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.add_tokens(list(added))
    for offset, token in enumerate(added):
        if tokenizer.token_to_id(token.content) != len(ranks) + offset:
            raise ValueError(f"added token {token.content!r} did not get id {len(ranks) + offset}")
    return tokenizer
