"""The job contract between the API and the workers: one typed payload per job kind, and the result of each.

The API validates a request against its base model, builds the job's payload model and stores
`payload.to_json()` in the database; a worker gets it back, parsed once, as `ClaimedJob.payload` (`api/db/jobs.py`)
and dispatches on its type. A job's kind is a class constant of its payload (`JobPayload.kind`), so the kind and
the payload can never disagree. Results are the Tinker wire responses (`loom.types`), plus `OpenAISampleResult`
for OpenAI-shaped sample jobs, which the API turns into OpenAI JSON.

Payload models forbid unknown fields: a payload written by a newer API that this worker does not understand fails
that one job (as `UnreadablePayload`) instead of running with part of the request ignored.

Limits: payloads are stored as JSON, so floats round-trip through `json` (NaN and infinities included) and tuples
come back as lists. A payload stored before this contract existed is converted by migration 0004.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loom.types import (
    AdamParams,
    CreateModelResponse,
    CustomLossGraph,
    CustomLossInput,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    LoadWeightsResponse,
    ModelInput,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    UnloadModelResponse,
)

DEFAULT_LORA_RANK = 32
"""The LoRA rank of a run whose `create_model` request names none (Tinker's default)."""


class JobKind(StrEnum):
    CREATE_MODEL = "create_model"
    FORWARD_BACKWARD = "forward_backward"
    FORWARD = "forward"
    OPTIM_STEP = "optim_step"
    SAVE_WEIGHTS = "save_weights"
    SAVE_WEIGHTS_FOR_SAMPLER = "save_weights_for_sampler"
    SAVE_WEIGHTS_EXTERNAL = "save_weights_external"
    LOAD_WEIGHTS = "load_weights"
    SAMPLE = "sample"
    UNLOAD_MODEL = "unload_model"


class ContractModel(BaseModel):
    """Strict, immutable pydantic base of everything in a payload that is Loom's own (not a Tinker wire type)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), ser_json_inf_nan="constants")


class JobPayload(ContractModel):
    """What one job of kind `kind` asks a worker to do."""

    kind: ClassVar[JobKind]

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready form the job store keeps (`None` fields left out; they are the defaults)."""
        return self.model_dump(mode="json", exclude_none=True)

    def cost_tokens(self) -> int:
        """Tokens of a worker tick's training budget this job spends (what a claim packs a tick up to): a forward
        pass's tokens; 0 for cheap ops and for samples (the decode batch admits those by its own KV budget)."""
        return 0


# -- training ops ----------------------------------------------------------------------------------------------


class RunLora(ContractModel):
    """A run's LoRA configuration, every default resolved by the API."""

    rank: int = Field(gt=0)
    seed: int
    train_attn: bool
    train_mlp: bool
    """Includes shared and routed MoE experts."""
    train_unembed: bool
    train_vision: bool = False
    """A vision-language model's vision tower and merger."""


def default_lora_seed(model_id: str) -> int:
    """The seed of a run created without one: derived from its id, so a rebuild by replay draws the same factors."""
    return int.from_bytes(hashlib.sha256(model_id.encode()).digest()[:4], "big")


class CreateModelJob(JobPayload):
    """Create a run with freshly initialised LoRA factors (seq 0 of the run)."""

    kind = JobKind.CREATE_MODEL
    lora: RunLora


class CustomLossSpec(ContractModel):
    """A stored custom loss as a worker runs it: its declared inputs (`logprobs` first) and its graph, both checked
    by the API (`contract/custom_loss_graph.py`) when the loss was created."""

    name: str
    inputs: list[CustomLossInput]
    graph: CustomLossGraph


class RecordedTargets(ContractModel):
    """stable_reinforce's view of one datum's target rows, resolved by the API from the datum's provenance against
    the sampler's records: which rows reproduce a sampled token, and the sampler's logprob of it (0 elsewhere)."""

    sampled: list[bool]
    logprobs: list[float]


class ForwardBackwardJob(JobPayload):
    """One forward and backward pass over `input`; gradients accumulate on the run until its next `optim_step`."""

    kind = JobKind.FORWARD_BACKWARD
    input: ForwardBackwardInput
    custom_loss: CustomLossSpec | None = None
    """The loss `loss_fn="custom"` names by its `loss_id`, resolved by the API."""
    recorded: list[RecordedTargets] | None = None
    """stable_reinforce only: one entry per datum."""

    def cost_tokens(self) -> int:
        return sum(datum.model_input.length for datum in self.input.data)


class ForwardJob(ForwardBackwardJob):
    """A forward pass only: logprobs and loss, no gradients, no change to the run."""

    kind = JobKind.FORWARD


class OptimStepJob(JobPayload):
    kind = JobKind.OPTIM_STEP
    adam: AdamParams


class CheckpointTarget(ContractModel):
    """Where a checkpoint goes, resolved by the API: its id within the run and its `tinker://` path."""

    checkpoint_id: str
    tinker_path: str
    ttl_seconds: int | None = None
    overwrite: bool = False
    ephemeral: bool = False
    """Not listed to users (a sampling session's snapshot, or a recovery checkpoint)."""


class SaveWeightsJob(JobPayload):
    """Save the run's adapter and Adam state (`tinker://<run>/weights/<name>`)."""

    kind = JobKind.SAVE_WEIGHTS
    target: CheckpointTarget


class SaveWeightsForSamplerJob(JobPayload):
    """Save the run's adapter for sampling; an ephemeral save answers with the sampling session bound to it."""

    kind = JobKind.SAVE_WEIGHTS_FOR_SAMPLER
    target: CheckpointTarget
    sampling_session_id: str | None = None


class SaveWeightsExternalJob(JobPayload):
    """Save the run's adapter as a downloadable PEFT folder (`tinker://<run>/external_weights/<name>`); with
    `age_recipients`, every file is age-encrypted to them and stored as `<file>.age` (`contract/age_encryption.py`)."""

    kind = JobKind.SAVE_WEIGHTS_EXTERNAL
    target: CheckpointTarget
    age_recipients: list[str] | None = None


class LoadWeightsJob(JobPayload):
    """Replace the run's state with a training checkpoint's (at seq 0: create the run from it)."""

    kind = JobKind.LOAD_WEIGHTS
    tinker_path: str
    storage_uri: str
    with_optimizer: bool = False


class UnloadModelJob(JobPayload):
    """Drop the run's state from its worker; the run accepts no further ops."""

    kind = JobKind.UNLOAD_MODEL


# -- sampling ----------------------------------------------------------------------------------------------------


class TinkerPrompt(ContractModel):
    """A Tinker `asample` prompt, already checked against the model's vocabulary and context by the API."""

    type: Literal["tinker"] = "tinker"
    model_input: ModelInput
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = Field(default=0, ge=0)


class _OpenAIReply(ContractModel):
    """How an OpenAI job is answered: token events as they come (`stream`), and alternatives per token."""

    stream: bool = False
    top_logprobs: int = Field(default=0, ge=0)


class ChatPrompt(_OpenAIReply):
    """OpenAI chat messages (and tool schemas), rendered to tokens by the worker with the model's chat template."""

    type: Literal["chat"] = "chat"
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


class CompletionPrompt(_OpenAIReply):
    """An OpenAI completion prompt: text the worker tokenizes, or token ids."""

    type: Literal["completion"] = "completion"
    prompt: str | list[int]


Prompt = Annotated[TinkerPrompt | ChatPrompt | CompletionPrompt, Field(discriminator="type")]
OpenAIPrompt = ChatPrompt | CompletionPrompt


class SampleJob(JobPayload):
    """Sample `num_samples` continuations of `prompt` from the base model, or from the sampler checkpoint stored at
    `storage_uri`. A Tinker prompt is answered with a `SampleResponse`; an OpenAI one with `OpenAISampleResult`."""

    kind = JobKind.SAMPLE
    prompt: Prompt
    sampling_params: SamplingParams
    num_samples: int = Field(default=1, ge=1)
    storage_uri: str | None = None
    record_stability_info: bool | None = None
    """True: the result is kept as the record stable_reinforce trains against (`api/stability.py`)."""


class OpenAIChoice(ContractModel):
    """One finished sequence of an OpenAI job, before the API shapes it into chat or completion JSON."""

    text: str
    """The answer's text; when tool calls were parsed out of it, the text outside them."""
    finish_reason: Literal["stop", "length", "tool_calls"]
    tokens: list[int]
    token_strs: list[str]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[str, float]]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """OpenAI `tool_calls` entries (`id`, `type: "function"`, `function: {name, arguments}` with `arguments` a
    JSON string) parsed out of the answer in the model's chat format; None when there were none."""


class OpenAISampleResult(ContractModel):
    type: Literal["openai"] = "openai"
    prompt_tokens: int
    choices: list[OpenAIChoice]


# -- parsing -----------------------------------------------------------------------------------------------------

PAYLOAD_TYPES: dict[JobKind, type[JobPayload]] = {
    cls.kind: cls
    for cls in (
        CreateModelJob,
        ForwardBackwardJob,
        ForwardJob,
        OptimStepJob,
        SaveWeightsJob,
        SaveWeightsForSamplerJob,
        SaveWeightsExternalJob,
        LoadWeightsJob,
        UnloadModelJob,
        SampleJob,
    )
}

JobResult = (
    CreateModelResponse
    | ForwardBackwardOutput
    | OptimStepResponse
    | SaveWeightsResponse
    | SaveWeightsForSamplerResponse
    | SaveWeightsExternalResponse
    | LoadWeightsResponse
    | UnloadModelResponse
    | SampleResponse
    | OpenAISampleResult
)
"""What a job that succeeded produced; stored as `result_json(result)` and returned to the client."""


def result_json(result: JobResult) -> dict[str, Any]:
    """The JSON-ready form of a result, as the client receives it (`None` fields left out, as Tinker sends them)."""
    return result.model_dump(mode="json", exclude_none=True, by_alias=True)


@dataclass(frozen=True, slots=True)
class UnreadablePayload:
    """A stored payload this worker cannot parse (written by a newer API, or damaged): its job fails alone."""

    error: str


def parse_payload(kind: str, raw: dict[str, Any]) -> JobPayload | UnreadablePayload:
    """The typed payload of a stored job, or `UnreadablePayload` saying why there is none."""
    try:
        cls = PAYLOAD_TYPES[JobKind(kind)]
    except ValueError:
        return UnreadablePayload(f"unknown job kind {kind!r}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        return UnreadablePayload(f"unreadable {kind} payload: {exc}")


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job leased to a worker: what it must execute, detached from any database session."""

    id: str
    kind: JobKind
    owner: str
    base_model: str
    model_id: str | None
    """The training run (training ops) or sampling session (session samples) the job belongs to."""
    seq_id: int | None
    """Its place in that run's (or session's) order; None for unordered jobs."""
    payload: JobPayload | UnreadablePayload
    fencing_token: int
