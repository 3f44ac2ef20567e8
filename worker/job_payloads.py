"""Turn stored job payloads (Tinker wire JSON) into engine work, and engine results back into wire JSON.

Payloads are re-parsed with the wire types and re-checked with `loom.types.validation` (the same checks the API
ran at submit time), because a queue may hold jobs from an older API or another writer. A failure raises
`UserInputError`, which the engine reports as a `user` failure of that one request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import ValidationError

from loom.types import AdamParams, ForwardBackwardInput, SampleRequest
from loom.types.validation import InvalidRequest, check_adam, check_forward_backward, check_sample
from worker.sampler import SampleOutput, SampleWork
from worker.trainer import ItemResult, TrainDatum


class UserInputError(ValueError):
    """The request cannot run on this model; reported as a `user` error."""


def _parse(model: type, data: Any):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserInputError(str(exc)) from exc


def train_data(payload: Mapping[str, Any], vocab_size: int, max_length: int) -> tuple[list[TrainDatum], str, dict]:
    """Datums, loss_fn and loss_fn_config of a forward_backward payload, validated against the model."""
    fb = _parse(ForwardBackwardInput, payload["forward_backward_input"])
    try:
        check_forward_backward(fb, vocab_size, max_length)
    except InvalidRequest as exc:
        raise UserInputError(f"{exc.param}: {exc}") from exc
    datums = []
    for datum in fb.data:
        tokens = [t for chunk in datum.model_input.chunks for t in chunk.tokens]
        inputs = {}
        for key, tensor in datum.loss_fn_inputs.items():
            dtype = torch.long if key == "target_tokens" else torch.float32
            inputs[key] = torch.tensor(tensor.dense_data(), dtype=dtype).reshape(tensor.dense_shape)
        datums.append(TrainDatum(tokens, inputs))
    return datums, fb.loss_fn, dict(fb.loss_fn_config or {})


def adam_step(payload: Mapping[str, Any]) -> AdamParams:
    params = _parse(AdamParams, payload.get("adam_params") or {})
    try:
        check_adam(params.model_dump())
    except InvalidRequest as exc:
        raise UserInputError(f"{exc.param}: {exc}") from exc
    return params


def sample_work(payload: Mapping[str, Any], slot: int | None, vocab_size: int, max_length: int) -> SampleWork:
    request = _parse(SampleRequest, payload)
    try:
        prompt = check_sample(request, vocab_size, max_length)
    except InvalidRequest as exc:
        raise UserInputError(f"{exc.param}: {exc}") from exc
    params = request.sampling_params
    stop = params.stop or []
    if isinstance(stop, str):
        stop = [stop]
    return SampleWork(
        slot=slot,
        prompt=prompt,
        num_samples=request.num_samples,
        max_tokens=params.max_tokens if params.max_tokens is not None else 16,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        stop_tokens=[s for s in stop if isinstance(s, int)],
        stop_strings=[s for s in stop if isinstance(s, str)],
        seed=params.seed,
        prompt_logprobs=bool(request.prompt_logprobs),
        topk_prompt_logprobs=request.topk_prompt_logprobs,
        stop_at_eos=params.stop != [],
    )


def _tensor_json(t: torch.Tensor) -> dict[str, Any]:
    return {"data": t.reshape(-1).tolist(), "dtype": "float32", "shape": list(t.shape)}


def forward_backward_result(result: ItemResult) -> dict[str, Any]:
    return {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [{"logprobs": _tensor_json(lp)} for lp in result.logprobs],
        "metrics": {"loss:sum": result.loss_sum},
    }


def sample_result(output: SampleOutput) -> dict[str, Any]:
    return {
        "type": "sample",
        "sequences": [
            {"stop_reason": s.stop_reason, "tokens": s.tokens, "logprobs": s.logprobs} for s in output.sequences
        ],
        "prompt_logprobs": output.prompt_logprobs,
        "topk_prompt_logprobs": output.topk_prompt_logprobs,
        "prompt_cache_hit_tokens": output.cache_hit_tokens,
    }
