"""Training wire types: model creation, forward/backward, optimizer, weights.

Role: request/response bodies of ``/api/v1/create_model``, ``get_info``,
``unload_model``, ``forward_backward``, ``forward``, ``optim_step``,
``save_weights``, ``save_weights_for_sampler``, ``save_weights_external`` and ``load_weights``.

Wire-shape notes:
- ``ForwardBackwardRequest`` serialises to the SDK ≤0.24 JSON shape
  ``{"forward_backward_input": {data, loss_fn, loss_fn_config}, "model_id",
  "seq_id"}``. It also *accepts* the flattened shape of SDK ≥0.25 (whose
  protobuf message has ``data``/``loss_fn``/``loss_fn_config``/``forward_only``
  at top level) and the ``/forward`` body (``forward_input``), which it marks
  ``forward_only=True``.
- ``OptimStepRequest`` sends Adam parameters as ``adam_params``; SDK 0.38's
  alias ``optim_params`` is accepted on input.
- Numbers carry their bounds in their types (``bounded.py``): ids and seq_ids
  are 64-bit, seeds, TTLs and the learning rate are range-checked, and one
  request holds at most ``MAX_DATUMS`` datums.
- ``LossFnType`` lists every loss of SDK 0.38, all implemented server-side. ``custom`` names a loss stored by
  ``create_custom_loss``: its ``loss_fn_config`` is ``{"loss_id": <id>}``, the one text value a config may hold.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, model_validator

from ._base import WireModel
from .bounded import Count64, Int64, JsonObject, LearningRate, Seed, TtlSeconds
from .limits import INT64_MAX, MAX_AGE_RECIPIENTS, MAX_DATUMS
from .model_input import Datum
from .tensors import TensorData

LossFnType = Literal[
    "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce", "custom"
]
"""The losses of SDK 0.38's ``LossFnType``, all run server-side."""


# --------------------------------------------------------------------- models
class LoraConfig(WireModel):
    rank: int = Field(gt=0, le=INT64_MAX)
    seed: Seed | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    """Includes MoE experts."""
    train_attn: bool = True
    train_vision: bool | None = None
    """Loom's extension: True also trains a vision-language model's vision tower and patch merger (refused for
    text models). Left out (None, as the official SDK always leaves it): the language model only."""


class OptimizerConfig(WireModel):
    """Optimizer family fixed at model creation (SDK 0.38); only ``adamw`` in Loom."""

    model_config = {**WireModel.model_config, "extra": "allow"}
    type: str = "adamw"


class CreateModelRequest(WireModel):
    session_id: str
    model_seq_id: Count64
    base_model: str
    user_metadata: JsonObject | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig | None = None
    """SDK 0.38 always sends ``{"type": "adamw"}``; older SDKs omit it."""
    type: Literal["create_model"] = "create_model"


class CreateModelResponse(WireModel):
    model_id: str
    type: Literal["create_model"] = "create_model"


class GetInfoRequest(WireModel):
    model_id: str
    type: Literal["get_info"] = "get_info"


class ModelData(WireModel):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None
    """HF tokenizer id; the SDK drops anything after the first ``:``."""


class GetInfoResponse(WireModel):
    type: Literal["get_info"] | None = "get_info"
    model_data: ModelData
    model_id: str
    optimizer_config: OptimizerConfig | None = None
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None


class UnloadModelRequest(WireModel):
    model_id: str
    type: Literal["unload_model"] = "unload_model"


class UnloadModelResponse(WireModel):
    model_id: str
    type: Literal["unload_model"] | None = "unload_model"


# --------------------------------------------------------- forward / backward
class ForwardBackwardInput(WireModel):
    data: list[Datum] = Field(max_length=MAX_DATUMS)
    loss_fn: LossFnType
    loss_fn_config: dict[str, float | str] | None = None
    """Loss hyper-parameters, e.g. ``clip_low_threshold`` for ppo, ``beta`` for dro, ``kl_coeff`` for
    stable_reinforce; ``loss_id`` (text) for ``custom``."""


def _flat_to_nested(data: Any, nested_key: str) -> Any:
    """Accept the flattened (protobuf-era) and ``forward_input`` shapes."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    if nested_key not in data:
        for other in ("forward_backward_input", "forward_input"):
            if other in data and other != nested_key:
                data[nested_key] = data.pop(other)
                if other == "forward_input":
                    data.setdefault("forward_only", True)
                break
        else:
            if "data" in data or "loss_fn" in data:
                data[nested_key] = {k: data.pop(k) for k in ("data", "loss_fn", "loss_fn_config") if k in data}
    return data


class ForwardBackwardRequest(WireModel):
    """Body of ``POST /api/v1/forward_backward`` (JSON form)."""

    forward_backward_input: ForwardBackwardInput
    model_id: str
    seq_id: Int64 | None = None
    forward_only: bool | None = None
    """True runs the forward pass only (SDK ≥0.25's replacement for ``/forward``).
    ``None`` (omitted on the wire) means False."""

    @model_validator(mode="before")
    @classmethod
    def _accept_flat(cls, data: Any) -> Any:
        return _flat_to_nested(data, "forward_backward_input")

    @property
    def is_forward_only(self) -> bool:
        return bool(self.forward_only)


class ForwardRequest(WireModel):
    """Body of ``POST /api/v1/forward`` (SDK ≤0.24): forward pass, no gradients."""

    forward_input: ForwardBackwardInput
    model_id: str
    seq_id: Int64 | None = None

    @model_validator(mode="before")
    @classmethod
    def _accept_flat(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "forward_only"}
        return _flat_to_nested(data, "forward_input")

    def to_forward_backward_request(self) -> ForwardBackwardRequest:
        return ForwardBackwardRequest(
            forward_backward_input=self.forward_input,
            model_id=self.model_id,
            seq_id=self.seq_id,
            forward_only=True,
        )


class ForwardBackwardOutput(WireModel):
    """Result of forward/backward (or forward)."""

    loss_fn_output_type: str = "ArrayRecord"
    loss_fn_outputs: list[dict[str, TensorData]] = Field(default_factory=list)
    """Per datum: name -> tensor (always ``logprobs`` for the built-in losses)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Keys are ``name:reduction``, e.g. ``loss:sum``."""


# ------------------------------------------------------------------ optimizer
class AdamParams(WireModel):
    """AdamW hyper-parameters for one optimizer step (tinker defaults)."""

    learning_rate: LearningRate = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    grad_clip_norm: float = 0.0
    """Global gradient-norm clip; 0 disables clipping."""


class OptimStepRequest(WireModel):
    adam_params: AdamParams = Field(validation_alias=AliasChoices("adam_params", "optim_params"))
    model_id: str
    seq_id: Int64 | None = None
    type: Literal["optim_step"] = "optim_step"


class OptimStepResponse(WireModel):
    metrics: dict[str, float] | None = None


# -------------------------------------------------------------------- weights
class SaveWeightsRequest(WireModel):
    """``save_state``: LoRA weights + optimizer state under ``tinker://<run>/weights/<path>``."""

    model_id: str
    path: str | None = None
    """Checkpoint name (not a full tinker:// path)."""
    seq_id: Int64 | None = None
    ttl_seconds: TtlSeconds | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsResponse(WireModel):
    path: str
    type: Literal["save_weights"] | None = "save_weights"


SamplingClientKind = Literal["snapshot", "inflight"]


class SaveWeightsForSamplerRequest(WireModel):
    """Sampler weights. With ``path`` -> persistent ``sampler_weights/<path>``;
    without ``path`` but with ``sampling_session_seq_id`` -> an ephemeral
    snapshot answered with a ``sampling_session_id``."""

    model_id: str
    path: str | None = None
    sampling_session_seq_id: Count64 | None = None
    kind: SamplingClientKind = "snapshot"
    seq_id: Int64 | None = None
    ttl_seconds: TtlSeconds | None = None
    user_metadata: dict[str, str] | None = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


class SaveWeightsForSamplerResponse(WireModel):
    """``path`` for named saves, ``sampling_session_id`` for ephemeral ones."""

    path: str | None = None
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] | None = "save_weights_for_sampler"


SaveWeightsForSamplerResponseInternal = SaveWeightsForSamplerResponse


class SaveWeightsExternalRequest(WireModel):
    """A downloadable PEFT adapter under ``tinker://<run>/external_weights/<path>``; with
    ``age_encryption_recipients`` every file is age-encrypted to them and stored with a ``.age`` suffix."""

    model_id: str
    path: str
    """Checkpoint name (not a full tinker:// path)."""
    seq_id: Int64 | None = None
    ttl_seconds: TtlSeconds | None = None
    age_encryption_recipients: list[str] | None = Field(default=None, min_length=1, max_length=MAX_AGE_RECIPIENTS)
    """age recipients: native ``age1...`` keys or SSH public keys (``ssh-ed25519 ...``, ``ssh-rsa ...``)."""
    type: Literal["save_weights_external"] = "save_weights_external"


class SaveWeightsExternalResponse(WireModel):
    path: str
    size_bytes: int | None = None
    """Bytes of the stored files."""
    type: Literal["save_weights_external"] | None = "save_weights_external"


class LoadWeightsRequest(WireModel):
    """Load a ``tinker://…/weights/…`` checkpoint.

    Two addressings: ``model_id`` + ``seq_id`` (an existing model), or
    ``session_id`` + ``model_seq_id`` (create the model from the checkpoint;
    the load is its seq 0).
    """

    model_id: str | None = None
    seq_id: Int64 | None = None
    session_id: str | None = None
    model_seq_id: Count64 | None = None
    base_model: str | None = None
    user_metadata: JsonObject | None = None
    path: str
    optimizer: bool = False
    """Also restore the Adam moments."""
    optimizer_config: OptimizerConfig | None = None
    weights_access_token: str | None = None
    type: Literal["load_weights"] = "load_weights"

    @model_validator(mode="after")
    def _one_addressing(self) -> "LoadWeightsRequest":
        if self.model_id is None and self.session_id is None:
            raise ValueError("load_weights needs model_id or session_id")
        if self.model_id is not None and self.session_id is not None:
            raise ValueError("load_weights takes model_id or session_id, not both")
        return self


class LoadWeightsResponse(WireModel):
    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] | None = "load_weights"
