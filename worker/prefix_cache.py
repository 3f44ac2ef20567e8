"""Reusable prompt KV states: a later prompt that extends a cached one prefills only its new tokens.

Entries are keyed by (tenant salt, adapter key) — the adapter key names the exact weights (a checkpoint's
storage URI, or the base model) — so one tenant's cached prompts never serve, or reveal timing to, another
tenant, and a re-saved adapter never reuses states computed with old weights. Eviction is least-recently-used
over a budget of cached tokens.

Limits: exact token-prefix matches only (no radix tree); a lookup scans the entries of its key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch

LayerStates = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer (keys, values), each (1, heads, tokens, dim)."""


class PrefixCache:
    def __init__(self, max_tokens: int = 65536) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[Hashable, tuple[int, ...]], LayerStates] = OrderedDict()
        self._tokens = 0
        self.hits = 0
        self.hit_tokens = 0

    def lookup(self, key: Hashable, prompt: list[int]) -> tuple[int, LayerStates] | None:
        """The longest cached strict prefix of `prompt` under `key`: (its length, its states)."""
        best: tuple[Hashable, tuple[int, ...]] | None = None
        for entry_key in self._entries:
            owner, tokens = entry_key
            if owner == key and len(tokens) < len(prompt) and (best is None or len(tokens) > len(best[1])):
                if list(tokens) == prompt[: len(tokens)]:
                    best = entry_key
        if best is None:
            return None
        self._entries.move_to_end(best)
        self.hits += 1
        self.hit_tokens += len(best[1])
        return len(best[1]), self._entries[best]

    def store(self, key: Hashable, prompt: list[int], states: LayerStates) -> None:
        entry_key = (key, tuple(prompt))
        if entry_key in self._entries or len(prompt) > self.max_tokens:
            return
        self._entries[entry_key] = [(k.clone(), v.clone()) for k, v in states]
        self._tokens += len(prompt)
        while self._tokens > self.max_tokens:
            (_, tokens), _ = self._entries.popitem(last=False)
            self._tokens -= len(tokens)
