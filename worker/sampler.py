"""KV-cache decoding with continuous batching: many sample requests, each row with its own adapter and parameters.

A `DecodeBatch` holds the live rows of every in-flight request in one left-padded KV cache. `admit()` prefills a
group of new prompts (computing prompt logprobs on the way), replicates each prompt's cache row `num_samples`
times and merges them into the running batch between decode steps; `step()` picks one token for every live row
from its last logits (its own temperature / top-k / top-p and seeded generator), retires rows that stopped (stop
token, stop string, the model's EOS, or `max_tokens`) and runs one forward pass for the rest. Rows stay sorted
by adapter slot so each LoRA sees a contiguous slice. `run_sampling()` is the static-batch special case.

One row's trouble stays in its request: a row whose logits or probabilities are not finite (a diverged adapter)
fails with `NonFiniteLogits`, and any other exception while choosing its token fails it too; `step()` then drops
every row of that request and reports it in `failed`, while the other rows go on exactly as they would have
without it (each row samples with its own generator; rows never mix in the forward pass). A request's seed is
folded into the generator's 64-bit range, so any integer seed is accepted.

Returned logprobs are those of the sampled token under the temperature-scaled distribution log_softmax(z / τ)
(τ = 1 when greedy), before top-k / top-p truncation — the same quantity the trainer computes at τ = 1. A stop
token or the token completing a stop string is kept in the output. `top_logprobs` > 0 also records, per sampled
token, the k most likely tokens under that same distribution.

A prompt extending one seen before under the same (tenant, adapter) key reuses its KV states from the
`PrefixCache` and prefills only the new tokens; prompts with images are keyed by their images' content hashes
(`prompt_identity`), and reuse a prefix only when every image lies inside it.

A vision model's prompts prefill with their images (pixels through the vision tower) and explicit multimodal
rotary positions (`rope_positions`); each row then decodes from one past its largest position.

The model and its KV cache live on the worker's device (`lm.device`); the bookkeeping (masks, positions, the last
logits each row samples from with its CPU generator) stays on the CPU. A prefill computes only each row's last
logits unless one of its requests asks for prompt scores.

Limits: padding, not paging — a batch's cache is (rows × longest row); `token_budget` bounds rows × length and
`fits()` tells the caller when a group would exceed it. An exception in a batched forward pass (prefill or
decode step) is not confined to a row: it leaves the batch unusable and the caller starts a new one.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from contract.settings import DEFAULT_TOKEN_BUDGET
from worker.models.loader import LoadedModel
from worker.models.vision_inputs import VisionImage, patch_count, prompt_identity, rope_positions, vision_kwargs
from worker.prefix_cache import PrefixCache

SEED_SPACE = 1 << 64
"""A torch generator takes 64-bit seeds; larger (or negative) request seeds are folded into that range."""


class NonFiniteLogits(ValueError):
    """A row's logits or sampling probabilities hold NaN or infinity (a `user` error of that row's request)."""


@dataclass
class SampleWork:
    slot: int | None
    prompt: list[int]
    num_samples: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    stop_tokens: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    top_logprobs: int = 0
    """Per sampled token, also return this many most likely alternatives."""
    stop_at_eos: bool = True
    """False when the request passed `stop=[]` (Tinker: an empty list disables the implicit EOS stop)."""
    cache_key: Hashable | None = None
    """(tenant salt, adapter key) under which this prompt's KV may be reused; None disables the prefix cache."""
    images: list[VisionImage] = field(default_factory=list)
    """A vision model's prompt images, in order; `prompt` holds each as its run of image tokens."""


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str
    """"stop" or "length"."""
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class SampleOutput:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    cache_hit_tokens: int = 0


def _eos_ids(lm: LoadedModel) -> set[int]:
    eos = lm.model.generation_config.eos_token_id
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {int(eos)}


def _filter_logits(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k is not None and 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_z, idx = torch.sort(z, descending=True)
        probs = torch.softmax(sorted_z, -1)
        cum = torch.cumsum(probs, -1)
        drop = cum - probs > top_p
        z = z.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return z


_DIVERGED = "the adapter produced non-finite logits (diverged weights?); sample from an earlier checkpoint"


class Step(NamedTuple):
    """What one decode step did: (row, token) per row that got a token, the rows that finished, and the tags of
    requests that failed (with the exception), whose rows left the batch."""

    emitted: list[tuple[Row, int]]
    finished: list[Row]
    failed: dict[Any, Exception]


class Row:
    """One sequence being generated: its request, generator, tokens so far and why it stopped."""

    def __init__(self, work: SampleWork, gen: torch.Generator, eos: set[int], tag: Any, index: int) -> None:
        self.work, self.gen, self.tag, self.index = work, gen, tag, index
        implicit_eos = eos if work.stop_at_eos and not work.stop_tokens else set()
        self.stop_ids = set(work.stop_tokens) | implicit_eos
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] | None = [] if work.top_logprobs > 0 else None
        self.stop_reason: str | None = None

    def choose(self, z: torch.Tensor) -> tuple[int, float]:
        """The next token and its logprob; raises `NonFiniteLogits` if `z` (or the distribution) is not finite."""
        w = self.work
        if not bool(torch.isfinite(z).all()):
            raise NonFiniteLogits(_DIVERGED)
        scaled = z if w.temperature <= 0 else z / w.temperature
        logp = torch.log_softmax(scaled, -1)
        if w.temperature <= 0:
            token = int(torch.argmax(z))
        else:
            probs = torch.softmax(_filter_logits(scaled, w.top_k, w.top_p), -1)
            if not bool(torch.isfinite(probs).all()):
                raise NonFiniteLogits(_DIVERGED)
            token = int(torch.multinomial(probs, 1, generator=self.gen))
        if self.top is not None:
            vals, ids = torch.topk(logp, min(w.top_logprobs, logp.shape[-1]))
            self.top.append(list(zip(ids.tolist(), vals.tolist())))
        return token, float(logp[token])

    def push(self, token: int, lp: float, tokenizer) -> None:
        self.tokens.append(token)
        self.logprobs.append(lp)
        if token in self.stop_ids:
            self.stop_reason = "stop"
        elif self.work.stop_strings and any(
            s in tokenizer.decode(self.tokens[-64:], skip_special_tokens=False) for s in self.work.stop_strings
        ):
            self.stop_reason = "stop"
        elif len(self.tokens) >= self.work.max_tokens:
            self.stop_reason = "length"

    def sequence(self) -> SampledSequence:
        return SampledSequence(self.tokens, self.logprobs, self.stop_reason or "length", self.top)


def _prompt_scores(logits: torch.Tensor, prompt: list[int], topk: int, want_lp: bool):
    """Per prompt position i: log p(prompt[i] | prompt[:i]) and the top-k alternatives there (None at 0)."""
    logp = torch.log_softmax(logits[:-1].float(), -1).cpu()
    targets = torch.tensor(prompt[1:], dtype=torch.long)
    lps = [None] + logp.gather(-1, targets[:, None])[:, 0].tolist() if want_lp else None
    top = None
    if topk > 0:
        vals, ids = torch.topk(logp, min(topk, logp.shape[-1]), dim=-1)
        top = [None] + [list(zip(i.tolist(), v.tolist())) for i, v in zip(ids, vals)]
    return lps, top


def _next_positions(positions: torch.Tensor) -> torch.Tensor:
    """Per row, the position its first generated token takes: one past the largest position of its prompt (for a
    vision model, of its rotary positions: an image advances them by its extent, not by its token count)."""
    if positions.dim() == 3:
        return positions[1:].amax(dim=(0, 2)) + 1
    return positions.amax(dim=1) + 1


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - (dim % t.dim())) + [missing, 0]
    return F.pad(t, pad)


class DecodeBatch:
    """The live rows of all in-flight sample requests of one model, sharing one left-padded KV cache."""

    def __init__(self, lm: LoadedModel, token_budget: int = DEFAULT_TOKEN_BUDGET) -> None:
        self.lm = lm
        self.token_budget = token_budget
        self.eos = _eos_ids(lm)
        self.rows: list[Row] = []
        self.prefixes = PrefixCache()
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.next_pos = torch.zeros((0,), dtype=torch.long)
        self.last = torch.zeros((0, 0))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def fits(self, works: Sequence[SampleWork]) -> bool:
        """Would admitting `works` keep rows × (longest prompt + max_tokens) within the token budget?"""
        rows = len(self.rows) + sum(w.num_samples for w in works)
        longest = max(
            [self.width + max((r.work.max_tokens for r in self.rows), default=0)]
            + [len(w.prompt) + w.max_tokens for w in works]
        )
        return rows * longest <= self.token_budget

    @torch.no_grad()
    def admit(self, works: Sequence[SampleWork], tags: Sequence[Any]) -> list[SampleOutput]:
        """Prefill `works` and add their rows; returns each work's (still sequence-less) output with prompt scores.

        Works whose prompt extends a cached prefix (and that need no prompt logprobs) prefill only the rest.
        """
        outputs: list[SampleOutput] = [SampleOutput([]) for _ in works]
        fresh = []
        for i, w in enumerate(works):
            hit = None
            if w.cache_key is not None and not (w.prompt_logprobs or w.topk_prompt_logprobs):
                hit = self.prefixes.lookup(w.cache_key, self._identity(w))
                if hit is not None and w.images and self.lm.spec.image_token_id in w.prompt[hit[0] :]:
                    hit = None  # an image after the cached prefix: prefill the whole prompt with its pixels
            if hit is None:
                fresh.append(i)
            else:
                outputs[i].cache_hit_tokens = hit[0]
                self._admit_extending(w, tags[i], *hit)
        if fresh:
            self._admit_fresh([works[i] for i in fresh], [tags[i] for i in fresh], [outputs[i] for i in fresh])
        return outputs

    def _identity(self, work: SampleWork) -> list[int]:
        return prompt_identity(work.prompt, work.images, self.lm.spec.image_token_id)

    def _positions(self, ids: torch.Tensor, mask: torch.Tensor, images: list[VisionImage]) -> torch.Tensor:
        """Position ids of left-padded rows: (rows, length), or (4, rows, length) for a vision model."""
        if self.lm.images is None:
            return (mask.cumsum(-1) - 1).clamp(min=0)
        return rope_positions(self.lm.model, ids, mask, images, self.lm.images.spec)

    def _rows(self, work: SampleWork, tag: Any) -> list[Row]:
        gen = torch.Generator()
        gen.manual_seed(work.seed % SEED_SPACE if work.seed is not None else int(torch.randint(0, 2**62, (1,))))
        return [Row(work, gen, self.eos, tag, k) for k in range(work.num_samples)]

    def _remember(self, work: SampleWork, cache: DynamicCache, row: int, width: int) -> None:
        if work.cache_key is not None:
            n = len(work.prompt)
            states = [
                (layer.keys[row : row + 1, :, width - n :], layer.values[row : row + 1, :, width - n :])
                for layer in cache.layers
            ]
            self.prefixes.store(work.cache_key, self._identity(work), states)

    def _admit_fresh(self, works: list[SampleWork], tags: list[Any], outputs: list[SampleOutput]) -> None:
        order = sorted(range(len(works)), key=lambda i: -1 if works[i].slot is None else works[i].slot)
        width = max(len(works[i].prompt) for i in order)
        ids = torch.zeros((len(order), width), dtype=torch.long)
        mask = torch.zeros((len(order), width), dtype=torch.long)
        for r, i in enumerate(order):
            p = works[i].prompt
            ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1
        images = [image for i in order for image in works[i].images]
        positions = self._positions(ids, mask, images)
        device = self.lm.device
        extra = {} if self.lm.images is None else vision_kwargs(ids.to(device), images, self.lm.images.spec)
        cache = DynamicCache(config=self.lm.model.config)
        patches = [patch_count(works[i].images) for i in order]
        scored = any(works[i].prompt_logprobs or works[i].topk_prompt_logprobs for i in order)
        with self.lm.router.route([works[i].slot for i in order], patches):
            logits = self.lm.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=0 if scored else 1,  # without prompt scores only the last position's logits
                **extra,
            ).logits
        rows: list[Row] = []
        expand: list[int] = []
        for r, i in enumerate(order):
            w = works[i]
            if w.prompt_logprobs or w.topk_prompt_logprobs:
                n = len(w.prompt)
                lps, top = _prompt_scores(logits[r, width - n :], w.prompt, w.topk_prompt_logprobs, w.prompt_logprobs)
                outputs[i].prompt_logprobs, outputs[i].topk_prompt_logprobs = lps, top
            self._remember(w, cache, r, width)
            new = self._rows(w, tags[i])
            rows += new
            expand += [r] * len(new)
        index = torch.tensor(expand, dtype=torch.long)
        cache.batch_select_indices(index)
        next_pos = _next_positions(positions)
        self._merge(rows, cache, mask[index], next_pos[index], logits[index.to(device), -1, :].float().cpu())

    def _admit_extending(self, work: SampleWork, tag: Any, cached: int, states) -> None:
        cache = DynamicCache(config=self.lm.model.config)
        for layer_idx, (k, v) in enumerate(states):
            cache.update(k.clone(), v.clone(), layer_idx)
        n = len(work.prompt)
        ids = torch.tensor([work.prompt], dtype=torch.long)
        positions = self._positions(ids, torch.ones((1, n), dtype=torch.long), work.images)  # images: all cached
        device = self.lm.device
        with self.lm.router.route([work.slot]):
            logits = self.lm.model(
                input_ids=ids[:, cached:].to(device),
                attention_mask=torch.ones((1, n), dtype=torch.long, device=device),
                position_ids=positions[..., cached:].to(device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits.cpu()
        self._remember(work, cache, 0, n)
        rows = self._rows(work, tag)
        index = torch.zeros(len(rows), dtype=torch.long)
        cache.batch_select_indices(index)
        mask = torch.ones((len(rows), n), dtype=torch.long)
        self._merge(rows, cache, mask, _next_positions(positions)[index], logits[index, -1, :].float())

    def _merge(
        self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor, last: torch.Tensor
    ) -> None:
        if self.cache is None or not self.rows:
            self.rows, self.cache, self.mask, self.next_pos, self.last = rows, cache, mask, next_pos, last
        else:
            width = max(self.width, mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([_left_pad(mine.keys, width, -2), _left_pad(theirs.keys, width, -2)])
                mine.values = torch.cat([_left_pad(mine.values, width, -2), _left_pad(theirs.values, width, -2)])
            self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
            self.next_pos = torch.cat([self.next_pos, next_pos])
            self.last = torch.cat([self.last, last])
            self.rows = self.rows + rows
        order = sorted(
            range(len(self.rows)), key=lambda i: -1 if self.rows[i].work.slot is None else self.rows[i].work.slot
        )
        if order != list(range(len(self.rows))):
            self._select(order)

    def _select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.next_pos, self.last = self.mask[index], self.next_pos[index], self.last[index]
        lead = int((self.mask.cumsum(1) == 0).all(0).sum()) if len(keep) else 0
        if lead:  # every row is padded on the left by at least `lead`: drop those columns
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]

    @torch.no_grad()
    def step(self) -> Step:
        """Sample one token for every live row, retire finished rows and the rows of failed requests, and run the
        forward pass for the rest."""
        chosen: list[int] = []
        failed: dict[Any, Exception] = {}
        for row, z in zip(self.rows, self.last):
            try:
                token, lp = row.choose(z)
                row.push(token, lp, self.lm.tokenizer)
            except Exception as exc:  # this row's own trouble: it fails its request, and only that
                failed.setdefault(row.tag, exc)
                token = -1
            chosen.append(token)
        ok = [i for i, row in enumerate(self.rows) if row.tag not in failed]
        emitted = [(self.rows[i], chosen[i]) for i in ok]
        finished = [row for row, _ in emitted if row.stop_reason is not None]
        live = [i for i in ok if self.rows[i].stop_reason is None]
        tokens = torch.tensor([chosen[i] for i in live], dtype=torch.long)
        if len(live) < len(self.rows):
            if live:
                self._select(live)
            else:
                self.rows, self.cache = [], None
                self.mask = torch.zeros((0, 0), dtype=torch.long)
        if self.rows:
            self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
            with self.lm.router.route([row.work.slot for row in self.rows]):
                device = self.lm.device
                out = self.lm.model(
                    input_ids=tokens[:, None].to(device),
                    attention_mask=self.mask.to(device),
                    position_ids=self.next_pos[:, None].to(device),
                    past_key_values=self.cache,
                    use_cache=True,
                )
            self.last = out.logits[:, -1, :].float().cpu()
            self.next_pos = self.next_pos + 1
        return Step(emitted, finished, failed)


def run_sampling(lm: LoadedModel, works: Sequence[SampleWork]) -> list[SampleOutput]:
    """Sample every work to completion in one batch."""
    batch = DecodeBatch(lm)
    outputs = batch.admit(works, list(range(len(works))))
    done: list[list[Row]] = [[] for _ in works]
    while len(batch):
        step = batch.step()
        if step.failed:
            raise next(iter(step.failed.values()))
        for row in step.finished:
            done[row.tag].append(row)
    for out, rows in zip(outputs, done):
        out.sequences = [row.sequence() for row in sorted(rows, key=lambda r: r.index)]
    return outputs
