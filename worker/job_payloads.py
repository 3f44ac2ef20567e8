"""Turn contract payloads (`contract/jobs.py`) into engine work, and engine output into contract results.

Payloads arrive parsed and, except OpenAI prompts, already validated against this model by the API, so nothing
here re-checks them. An OpenAI prompt becomes tokens only here (the worker holds the tokenizer and chat
template), so its tokens and sampling parameters are checked here, once; a failure raises `UserInputError`,
which the engine reports as a `user` failure of that one request.
"""

from __future__ import annotations

import torch

from contract.custom_loss_graph import InvalidCustomLoss
from contract.jobs import (
    ChatPrompt,
    CompletionPrompt,
    ForwardBackwardJob,
    ForwardJob,
    RecordedTargets,
    SampleJob,
    TinkerPrompt,
)
from loom.types import ForwardBackwardInput, ForwardBackwardOutput, SampledSequence, SampleResponse, TensorData
from loom.types.validation import InvalidRequest, check_sampling, check_tokens, max_tokens_of
from worker.custom_loss import CustomLoss
from worker.losses import RECORDED_LOGPROBS, SAMPLED_MASK
from worker.models.loader import LoadedModel
from worker.models.vision_inputs import ImageEncoder, ImageInputError, VisionImage, flatten
from worker.openai_jobs import PromptError, render_prompt
from worker.sampler import SampleOutput, SampleWork
from worker.trainer import ItemResult, TrainDatum, WorkItem


class UserInputError(ValueError):
    """The request cannot run on this model; reported as a `user` error."""


def train_data(
    fb: ForwardBackwardInput, recorded: list[RecordedTargets] | None = None, images: ImageEncoder | None = None
) -> list[TrainDatum]:
    """The datums of a forward_backward input as tensors: targets as int64; every other input as float32, except
    that a custom loss gets its int64 inputs as int64 (as the SDK's client-side path would). `recorded` (one per
    datum, stable_reinforce) adds the sampler's records as the inputs `SAMPLED_MASK` and `RECORDED_LOGPROBS`.
    A vision model's `images` encoder turns image chunks into image-token runs and pixels (`ImageInputError`)."""
    datums = []
    for k, datum in enumerate(fb.data):
        tokens, encoded = flatten(datum.model_input, images)
        inputs = {}
        for key, tensor in datum.loss_fn_inputs.items():
            integer = key == "target_tokens" or (fb.loss_fn == "custom" and tensor.dtype == "int64")
            dtype = torch.long if integer else torch.float32
            inputs[key] = torch.tensor(tensor.dense_data(), dtype=dtype).reshape(tensor.dense_shape)
        if recorded is not None:
            inputs[SAMPLED_MASK] = torch.tensor(recorded[k].sampled, dtype=torch.float32)
            inputs[RECORDED_LOGPROBS] = torch.tensor(recorded[k].logprobs, dtype=torch.float32)
        datums.append(TrainDatum(tokens, inputs, encoded))
    return datums


def work_item(slot: int, job: ForwardBackwardJob, images: ImageEncoder | None = None) -> WorkItem:
    """One request's share of a mixed forward/backward pass on adapter `slot` (a `ForwardJob` computes no gradients),
    its images encoded by a vision model's `images`. A custom loss is rebuilt from its stored graph here; a graph
    this worker refuses, or an image it cannot encode, raises `UserInputError`."""
    fb = job.input
    try:
        custom_loss = None if job.custom_loss is None else CustomLoss(job.custom_loss)
    except InvalidCustomLoss as exc:
        raise UserInputError(f"custom loss {job.custom_loss.name!r}: {exc.param}: {exc}") from exc
    try:
        data = train_data(fb, job.recorded, images)
    except ImageInputError as exc:
        raise UserInputError(str(exc)) from exc
    return WorkItem(
        slot,
        data,
        fb.loss_fn,
        fb.loss_fn_config or {},
        isinstance(job, ForwardJob),
        custom_loss,
    )


def forward_backward_result(result: ItemResult) -> ForwardBackwardOutput:
    return ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[
            {"logprobs": TensorData(data=lp.reshape(-1).tolist(), dtype="float32", shape=list(lp.shape))}
            for lp in result.logprobs
        ],
        metrics={"loss:sum": result.loss_sum, **result.metrics},
    )


def prompt_tokens(lm: LoadedModel, job: SampleJob) -> tuple[list[int], list[VisionImage]]:
    """The prompt as token ids and encoded images: a Tinker prompt's own, or an OpenAI prompt rendered by the model's
    tokenizer and chat template in the catalogue entry's chat format (then checked against the model); raises
    `UserInputError` for a prompt this model cannot run."""
    prompt = job.prompt
    try:
        if isinstance(prompt, TinkerPrompt):
            return flatten(prompt.model_input, lm.images)
        tokens, images = render_prompt(lm.tokenizer, prompt, lm.spec.chat_format, lm.images)
        check_tokens(tokens, lm.spec.vocab_size, lm.spec.max_context_length, "prompt")
        check_sampling(
            len(tokens), job.sampling_params, job.num_samples, lm.spec.vocab_size, lm.spec.max_context_length
        )
    except (PromptError, InvalidRequest, ImageInputError) as exc:
        raise UserInputError(str(exc)) from exc
    return tokens, images


def sample_work(
    job: SampleJob, prompt: list[int], slot: int | None, images: list[VisionImage] | None = None
) -> SampleWork:
    """The decode work of a sample job whose prompt is `prompt` (with `images`), on adapter `slot` (None: the base
    model)."""
    params = job.sampling_params
    stop = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
    work = SampleWork(
        slot=slot,
        prompt=prompt,
        num_samples=job.num_samples,
        max_tokens=max_tokens_of(params),
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        stop_tokens=[s for s in stop if isinstance(s, int)],
        stop_strings=[s for s in stop if isinstance(s, str)],
        seed=params.seed,
        stop_at_eos=params.stop != [],
        images=images or [],
    )
    match job.prompt:
        case TinkerPrompt(prompt_logprobs=prompt_logprobs, topk_prompt_logprobs=topk):
            work.prompt_logprobs, work.topk_prompt_logprobs = prompt_logprobs, topk
        case ChatPrompt(top_logprobs=top) | CompletionPrompt(top_logprobs=top):
            work.top_logprobs = top
    return work


def sample_result(output: SampleOutput) -> SampleResponse:
    return SampleResponse(
        sequences=[
            SampledSequence(stop_reason=s.stop_reason, tokens=s.tokens, logprobs=s.logprobs) for s in output.sequences
        ],
        prompt_logprobs=output.prompt_logprobs,
        topk_prompt_logprobs=output.topk_prompt_logprobs,
        prompt_cache_hit_tokens=output.cache_hit_tokens,
    )
