"""Admission by cost: refuse at submit what no worker of the base model could ever run, before it is queued.

A worker trains in passes of at most `train_token_budget` padded tokens (rows × longest row; the trainer splits a
tick's rows into such micro-batches) and decodes with at most `token_budget` KV-cache tokens (rows × longest row).
So a request is refused with 413 `request_too_large`, naming the limit, when one of its sequences alone exceeds a
training pass, when it carries more tokens than one worker tick packs (`TRAIN_PASSES_PER_TICK` passes: one
request may not hold a worker for longer than that while other tenants wait), or when its samples cannot fit one decode batch. The same
numbers, with the estimated peak memory of a full pass, are reported per base model by `get_server_capabilities`.

Limits: costs are estimates from token counts: `train_bytes_per_token` and `kv_bytes_per_token` are per-model
constants of the catalogue (measured on CPU in fp32 by `benchmarks/train_pass_memory.py`); an OpenAI prompt is
tokenized by the worker, so here only its `n × max_tokens` is checked (the worker checks the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

from api.errors import APIError, ErrorCode
from contract.catalogue import BaseModelEntry
from contract.settings import TRAIN_PASSES_PER_TICK, Settings
from loom.types import ForwardBackwardInput, SupportedModel

GIB = 1 << 30


@dataclass(frozen=True)
class WorkerBudget:
    """What one worker of a base model can hold, from the settings every worker of the deployment shares."""

    model: BaseModelEntry
    train_token_budget: int
    kv_token_budget: int

    @classmethod
    def of(cls, model: BaseModelEntry, settings: Settings) -> WorkerBudget:
        return cls(model, settings.train_token_budget, settings.token_budget)

    @property
    def max_train_sequence(self) -> int:
        """The longest sequence a training request may hold: one pass, within the context."""
        return min(self.train_token_budget, self.model.max_context_length)

    @property
    def max_train_request_tokens(self) -> int:
        return TRAIN_PASSES_PER_TICK * self.train_token_budget

    @property
    def train_pass_bytes(self) -> int:
        """Estimated activation memory of one full training pass (on top of the resident model)."""
        return self.train_token_budget * self.model.train_bytes_per_token

    @property
    def kv_bytes(self) -> int:
        return self.kv_token_budget * self.model.kv_bytes_per_token

    def check_forward_backward(self, fb: ForwardBackwardInput) -> None:
        lengths = [datum.model_input.length for datum in fb.data]
        longest = max(lengths, default=0)
        if longest > self.max_train_sequence:
            i = lengths.index(longest)
            raise _too_large(
                f"datum {i} holds {longest} tokens; a training pass of {self.model.name} holds at most "
                f"{self.max_train_sequence} tokens per sequence (≈{self.train_pass_bytes / GIB:.1f} GiB)",
                f"data.{i}.model_input",
            )
        if sum(lengths) > self.max_train_request_tokens:
            raise _too_large(
                f"the request holds {sum(lengths)} tokens; one forward_backward on {self.model.name} may hold at "
                f"most {self.max_train_request_tokens} ({TRAIN_PASSES_PER_TICK} passes of "
                f"{self.train_token_budget}): split it into several requests",
                "data",
            )

    def check_sample(self, prompt_tokens: int, max_tokens: int, num_samples: int, param: str) -> None:
        """`num_samples` rows of `prompt_tokens + max_tokens` tokens must fit one decode batch."""
        need = num_samples * (prompt_tokens + max_tokens)
        if need > self.kv_token_budget:
            raise _too_large(
                f"{num_samples} samples × ({prompt_tokens} prompt + {max_tokens} new) tokens = {need} exceed the "
                f"{self.kv_token_budget} tokens one decode batch of {self.model.name} holds "
                f"(≈{self.kv_bytes / GIB:.1f} GiB of KV cache); ask for fewer samples or tokens",
                param,
            )

    def capabilities(self) -> SupportedModel:
        return SupportedModel(
            model_name=self.model.name,
            max_context_length=self.model.max_context_length,
            trainable=True,
            sampleable=True,
            max_train_sequence_tokens=self.max_train_sequence,
            train_pass_tokens=self.train_token_budget,
            max_train_request_tokens=self.max_train_request_tokens,
            estimated_train_pass_bytes=self.train_pass_bytes,
            sample_batch_tokens=self.kv_token_budget,
            aliases=list(self.model.aliases),
            architecture=self.model.arch,
            total_params=self.model.total_params,
            active_params=self.model.active_params,
            max_lora_rank=self.model.max_lora_rank,
            dtype=self.model.dtype,
        )


def _too_large(message: str, param: str) -> APIError:
    return APIError(413, ErrorCode.REQUEST_TOO_LARGE, message, param)
