"""Small valid job payloads of every kind, for tests of the job store, the worker registry and recovery.

`payload(kind, variant)` builds one; different `variant`s of a kind are different requests (for replay and
conflict tests), equal ones are the same request.
"""

from __future__ import annotations

from contract.jobs import (
    CheckpointTarget,
    CreateModelJob,
    ForwardBackwardJob,
    ForwardJob,
    JobKind,
    JobPayload,
    LoadWeightsJob,
    OptimStepJob,
    RunLora,
    SampleJob,
    SaveWeightsForSamplerJob,
    SaveWeightsJob,
    TinkerPrompt,
    UnloadModelJob,
)
from loom.types import AdamParams, Datum, ForwardBackwardInput, ModelInput, SamplingParams, TensorData


def fb_input(tokens: list[int], loss_fn: str = "cross_entropy") -> ForwardBackwardInput:
    """Next-token cross-entropy over `tokens` (inputs tokens[:-1], targets tokens[1:])."""
    targets = TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1])
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": targets})
    return ForwardBackwardInput(data=[datum], loss_fn=loss_fn)


def payload(kind: str | JobKind = JobKind.FORWARD_BACKWARD, variant: int = 0) -> JobPayload:
    target = CheckpointTarget(checkpoint_id=f"weights/v{variant}", tinker_path=f"tinker://run/weights/v{variant}")
    match JobKind(kind):
        case JobKind.CREATE_MODEL:
            return CreateModelJob(
                lora=RunLora(rank=8, seed=variant, train_attn=True, train_mlp=True, train_unembed=False)
            )
        case JobKind.FORWARD_BACKWARD:
            return ForwardBackwardJob(input=fb_input([1, 2, 3 + variant]))
        case JobKind.FORWARD:
            return ForwardJob(input=fb_input([1, 2, 3 + variant]))
        case JobKind.OPTIM_STEP:
            return OptimStepJob(adam=AdamParams(learning_rate=1e-4 * (variant + 1)))
        case JobKind.SAVE_WEIGHTS:
            return SaveWeightsJob(target=target)
        case JobKind.SAVE_WEIGHTS_FOR_SAMPLER:
            return SaveWeightsForSamplerJob(target=target)
        case JobKind.LOAD_WEIGHTS:
            return LoadWeightsJob(tinker_path=target.tinker_path, storage_uri=f"file:///ckpt/v{variant}")
        case JobKind.UNLOAD_MODEL:
            return UnloadModelJob()
        case JobKind.SAMPLE:
            prompt = TinkerPrompt(model_input=ModelInput.from_ints([1, 2, 3]))
            return SampleJob(prompt=prompt, sampling_params=SamplingParams(max_tokens=1 + variant))
