"""Checks a request must pass before any model runs it, given the base model's vocabulary and context size.

One implementation serves the API (which turns a failure into a 400 at submit time, so a worker is only ever
handed valid work), the worker (for OpenAI prompts, which only it can render to tokens), and SDK users who want
to fail fast locally. Each check raises `InvalidRequest` naming the offending field in `param`.

Checked: known loss and loss_fn_config keys (numbers, but text for a custom loss's `loss_id`); required/unknown
`loss_fn_inputs` (a custom loss's are the ones it declared, at their declared ranks); token ids inside the
vocabulary; sequence length within the context; `target_tokens` shape (N,) or (N, K) with N = model_input length
(2-D only for cross_entropy and custom losses declared so, K at most `MAX_TARGET_K`); every other input shaped like
the targets (weights) or (N,); finite values everywhere; stable_reinforce's provenance spans (tiling, and nonzero
advantages only on sampled rows; the spans' sequences themselves are checked by the server, `api/stability.py`); sampling parameter ranges (top-k prompt logprobs within the vocabulary). The model-independent
bounds (64-bit ids, seeds, TTLs, learning rate, datums per request, tensor sizes and CSR layout) are declared on the
wire types themselves (`bounded.py`, `tensors.py`), from the numbers in `limits.py`.

Limits: pure Python over the wire types (no numpy), so very large batches cost a Python loop over their values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .custom_loss import CustomLossInput
from .limits import MAX_SAMPLES, MAX_TARGET_K
from .model_input import Datum, EncodedTextChunk, ImageChunk, ModelInput, ProvenanceSpan
from .sampling import SampleRequest, SamplingParams
from .tensors import TensorData
from .training import ForwardBackwardInput

LOSS_REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    "gspo": ("target_tokens", "logprobs", "advantages"),
    "stable_reinforce": ("target_tokens", "advantages"),
}
"""Inputs of the built-in losses; a `custom` loss needs `target_tokens` and the inputs it declared."""
LOSS_OPTIONAL_INPUTS = frozenset({"weights", "clip_low_threshold", "clip_high_threshold"})
LOSS_EXTRA_OPTIONAL_INPUTS: dict[str, frozenset[str]] = {
    "gspo": frozenset({"sequence_ratio_mask"}),
    "stable_reinforce": frozenset({"logprobs"}),
}
"""Optional inputs of one loss only. stable_reinforce accepts the client's `logprobs` (the cookbook sends them)
but uses the sampler's recorded ones."""
LOSS_CONFIG_KEYS: dict[str, frozenset[str]] = {
    "cross_entropy": frozenset(),
    "importance_sampling": frozenset(),
    "ppo": frozenset({"clip_low_threshold", "clip_high_threshold"}),
    "cispo": frozenset({"clip_low_threshold", "clip_high_threshold"}),
    "dro": frozenset({"beta"}),
    "gspo": frozenset({"clip_low_threshold", "clip_high_threshold"}),
    "stable_reinforce": frozenset({"clip_high_threshold", "kl_coeff"}),
    "custom": frozenset({"loss_id"}),
}
TEXT_CONFIG_KEYS = frozenset({"loss_id"})
"""The `loss_fn_config` keys whose value is text; every other value is a number."""


DEFAULT_MAX_TOKENS = 16
"""The token limit of a sample request that names none (Tinker's default)."""


def max_tokens_of(params: SamplingParams) -> int:
    """The token limit a sample request asks for (`DEFAULT_MAX_TOKENS` when it names none)."""
    return params.max_tokens if params.max_tokens is not None else DEFAULT_MAX_TOKENS


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def model_input_tokens(
    model_input: ModelInput, vocab_size: int, max_length: int, param: str, image_token_id: int | None = None
) -> list[int]:
    """The flat token ids of a model input, checked against the vocabulary and context. `image_token_id` is set for
    a vision-language model: its image chunks (counted, `expected_tokens` set) become that many copies of it, and
    neither may its text hold that token nor may two images touch (each image must be its own run of image tokens,
    as the model locates images by those runs)."""
    tokens: list[int] = []
    previous_image = False
    for i, chunk in enumerate(model_input.chunks):
        where = f"{param}.chunks.{i}"
        if isinstance(chunk, EncodedTextChunk):
            if image_token_id is not None and image_token_id in chunk.tokens:
                raise InvalidRequest(f"text holds the image token {image_token_id}; send images as image chunks", where)
            tokens.extend(chunk.tokens)
            previous_image = False
            continue
        if image_token_id is None or not isinstance(chunk, ImageChunk) or chunk.expected_tokens is None:
            what = "this text-only base model" if image_token_id is None else "this base model"
            raise InvalidRequest(f"chunk type {chunk.type!r} is not supported by {what}", where)
        if previous_image:
            raise InvalidRequest("two images follow each other; put text (e.g. <|vision_end|>) between them", where)
        tokens.extend([image_token_id] * chunk.expected_tokens)
        previous_image = True
    check_tokens(tokens, vocab_size, max_length, param)
    return tokens


def check_tokens(tokens: Sequence[int], vocab_size: int, max_length: int, param: str) -> None:
    """A prompt or sequence: not empty, inside the vocabulary and the context."""
    if not tokens:
        raise InvalidRequest("model_input holds no tokens", param)
    for t in tokens:
        if not 0 <= t < vocab_size:
            raise InvalidRequest(f"token id {t} is outside the vocabulary [0, {vocab_size})", param)
    if len(tokens) > max_length:
        raise InvalidRequest(f"{len(tokens)} tokens exceed the model's context of {max_length}", param)


def _shape(tensor: TensorData) -> list[int]:
    return list(tensor.dense_shape) if tensor.shape is not None else [len(tensor.data)]


def _check_finite(values: Sequence[Any], param: str) -> None:
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidRequest("contains NaN or infinity", param)


def check_datum(
    datum: Datum,
    loss_fn: str,
    vocab_size: int,
    max_length: int,
    param: str,
    custom_inputs: Sequence[CustomLossInput] = (),
    image_token_id: int | None = None,
) -> list[int]:
    """One datum of a `loss_fn` request; `custom_inputs` are a `custom` loss's declared inputs (`logprobs` first).
    A custom loss reads only what it declared, so other inputs (which the SDK sends along) go unchecked."""
    tokens = model_input_tokens(datum.model_input, vocab_size, max_length, f"{param}.model_input", image_token_id)
    inputs = datum.loss_fn_inputs
    ranks = {item.name: item.rank for item in custom_inputs[1:]}
    required = ("target_tokens", *ranks) if loss_fn == "custom" else LOSS_REQUIRED_INPUTS[loss_fn]
    missing = [k for k in required if k not in inputs]
    if missing:
        raise InvalidRequest(f"{loss_fn} needs loss_fn_inputs {missing}", f"{param}.loss_fn_inputs")
    optional = LOSS_OPTIONAL_INPUTS | LOSS_EXTRA_OPTIONAL_INPUTS.get(loss_fn, frozenset())
    unknown = [] if loss_fn == "custom" else sorted(set(inputs) - set(required) - optional)
    if unknown:
        raise InvalidRequest(f"loss_fn_inputs {unknown} are not used by {loss_fn}", f"{param}.loss_fn_inputs")
    targets = inputs["target_tokens"]
    t_shape = _shape(targets)
    where = f"{param}.loss_fn_inputs.target_tokens"
    if len(t_shape) not in (1, 2) or t_shape[0] != len(tokens):
        raise InvalidRequest(
            f"shape {t_shape} must be [{len(tokens)}] or [{len(tokens)}, K] (model_input length)", where
        )
    target_rank = custom_inputs[0].rank if custom_inputs else (2 if loss_fn == "cross_entropy" else 1)
    if len(t_shape) > target_rank or (loss_fn == "custom" and len(t_shape) != target_rank):
        raise InvalidRequest(f"{len(t_shape)}-D target_tokens do not fit {loss_fn}'s logprobs", where)
    if len(t_shape) == 2 and not 1 <= t_shape[1] <= MAX_TARGET_K:
        raise InvalidRequest(f"K = {t_shape[1]} target tokens per position must be in [1, {MAX_TARGET_K}]", where)
    for t in targets.dense_data():
        if not (float(t).is_integer() and 0 <= t < vocab_size):
            raise InvalidRequest(f"target token {t} is outside the vocabulary [0, {vocab_size})", where)
    for key, tensor in inputs.items():
        if key == "target_tokens" or (loss_fn == "custom" and key not in ranks):
            continue
        shape, where = _shape(tensor), f"{param}.loss_fn_inputs.{key}"
        if key in ranks:
            if len(shape) != ranks[key] or (shape and shape[0] != len(tokens)):
                raise InvalidRequest(
                    f"shape {shape} is not the declared rank {ranks[key]} over {len(tokens)} rows", where
                )
        elif shape != (t_shape if key == "weights" else [len(tokens)]):
            raise InvalidRequest(
                f"shape {shape} does not match {t_shape if key == 'weights' else [len(tokens)]}", where
            )
        _check_finite(tensor.dense_data(), where)
    if loss_fn == "stable_reinforce":
        check_provenance(datum, len(tokens), param)
    return tokens


def check_provenance(datum: Datum, length: int, param: str) -> None:
    """stable_reinforce's provenance, as far as it can be checked without the server's records: both span lists,
    tiling the input tokens and the target rows, and nonzero advantages only on rows of sampled spans."""
    if datum.model_input_spans is None or datum.loss_fn_input_spans is None:
        raise InvalidRequest(
            "stable_reinforce needs provenance: sample with record_stability_info=True and attach the sequences' "
            "spans with Datum.with_provenance",
            f"{param}.loss_fn_input_spans",
        )
    for field, spans in (
        ("model_input_spans", datum.model_input_spans),
        ("loss_fn_input_spans", datum.loss_fn_input_spans),
    ):
        covered = sum(span.length for span in spans)
        if covered != length:
            raise InvalidRequest(f"spans cover {covered} positions, the datum has {length}", f"{param}.{field}")
    sampled = sampled_rows(datum.loss_fn_input_spans)
    for row, advantage in enumerate(datum.loss_fn_inputs["advantages"].dense_data()):
        if advantage != 0 and not sampled[row]:
            raise InvalidRequest(
                f"row {row} has a nonzero advantage but is not a sampled token; stable_reinforce trains only on "
                "tokens its provenance names as sampled",
                f"{param}.loss_fn_inputs.advantages",
            )


def sampled_rows(spans: Sequence[ProvenanceSpan]) -> list[bool]:
    """Per position the spans tile: whether it lies in a `sampled_tokens` span."""
    return [span.type == "sampled_tokens" for span in spans for _ in range(span.length)]


def check_forward_backward(
    fb: ForwardBackwardInput,
    vocab_size: int,
    max_length: int,
    custom_inputs: Sequence[CustomLossInput] = (),
    image_token_id: int | None = None,
) -> None:
    """A forward(_backward) input; for `custom`, `custom_inputs` are the stored loss's inputs (its `loss_id`
    already resolved by the caller)."""
    config = fb.loss_fn_config or {}
    unknown = sorted(set(config) - LOSS_CONFIG_KEYS[fb.loss_fn])
    if unknown:
        raise InvalidRequest(f"loss_fn_config keys {unknown} are not valid for {fb.loss_fn}", "loss_fn_config")
    for key, value in config.items():
        if isinstance(value, str) != (key in TEXT_CONFIG_KEYS):
            raise InvalidRequest(
                f"must be {'text' if key in TEXT_CONFIG_KEYS else 'a number'}", f"loss_fn_config.{key}"
            )
    if fb.loss_fn == "custom" and "loss_id" not in config:
        raise InvalidRequest("custom needs the loss_id create_custom_loss returned", "loss_fn_config.loss_id")
    _check_finite(list(config.values()), "loss_fn_config")
    if not fb.data:
        raise InvalidRequest("forward_backward needs at least one datum", "data")
    for i, datum in enumerate(fb.data):
        check_datum(datum, fb.loss_fn, vocab_size, max_length, f"data.{i}", custom_inputs, image_token_id)


def check_sample(
    request: SampleRequest, vocab_size: int, max_length: int, image_token_id: int | None = None
) -> list[int]:
    """The prompt tokens of an `asample` request that passes every check."""
    prompt = model_input_tokens(request.prompt, vocab_size, max_length, "prompt", image_token_id)
    if request.topk_prompt_logprobs > vocab_size:
        raise InvalidRequest(f"must be at most the vocabulary size {vocab_size}", "topk_prompt_logprobs")
    check_sampling(len(prompt), request.sampling_params, request.num_samples, vocab_size, max_length)
    return prompt


def check_sampling(
    prompt_length: int,
    params: SamplingParams,
    num_samples: int,
    vocab_size: int,
    max_length: int,
) -> None:
    """Sampling parameters, given the prompt's length and the model's vocabulary and context."""
    max_tokens = max_tokens_of(params)
    if max_tokens < 1:
        raise InvalidRequest("max_tokens must be at least 1", "sampling_params.max_tokens")
    if prompt_length + max_tokens > max_length:
        raise InvalidRequest(
            f"prompt ({prompt_length}) + max_tokens ({max_tokens}) exceed the context of {max_length}",
            "sampling_params.max_tokens",
        )
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise InvalidRequest("temperature must be finite and >= 0", "sampling_params.temperature")
    if not (0 < params.top_p <= 1):
        raise InvalidRequest("top_p must be in (0, 1]", "sampling_params.top_p")
    if params.top_k == 0 or params.top_k < -1:
        raise InvalidRequest("top_k must be -1 (off) or >= 1", "sampling_params.top_k")
    if num_samples > MAX_SAMPLES:
        raise InvalidRequest(f"num_samples is capped at {MAX_SAMPLES}", "num_samples")
    stop = params.stop if isinstance(params.stop, list) else []
    for s in stop:
        if isinstance(s, int) and not 0 <= s < vocab_size:
            raise InvalidRequest(f"stop token {s} is outside the vocabulary", "sampling_params.stop")


def check_adam(params: Mapping[str, float]) -> None:
    b1, b2, eps = (params.get(k) for k in ("beta1", "beta2", "eps"))
    for key, value in params.items():
        if not math.isfinite(value):
            raise InvalidRequest("must be finite", f"adam_params.{key}")
    for key, beta in (("beta1", b1), ("beta2", b2)):
        if beta is not None and not 0 <= beta < 1:
            raise InvalidRequest(f"{key} must be in [0, 1)", f"adam_params.{key}")
    if eps is not None and eps <= 0:
        raise InvalidRequest("eps must be > 0", "adam_params.eps")
    if params.get("weight_decay", 0) < 0 or params.get("grad_clip_norm", 0) < 0:
        raise InvalidRequest("weight_decay and grad_clip_norm must be >= 0", "adam_params")
