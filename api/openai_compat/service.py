"""What the OpenAI endpoint does between the HTTP layer and the workers.

`resolve_model` turns `model` into (base model, checkpoint storage) for the caller: a `tinker://` sampler or
training checkpoint path they may read, one of their aliases, or a base model id. Anything else — including
another tenant's checkpoint or alias — is the same 404 `model_not_found`, so ids cannot be probed. Resolving to a
checkpoint records its read (`checkpoint_read`, purpose `sampling`) for the owner's audit log in the caller's
transaction, which commits only with the queued completion.

`sample_job` builds the worker job (a `SampleJob` with a chat or completion prompt the worker renders);
`chat_response` / `completion_response` and the `*_chunk` helpers shape its `OpenAISampleResult` into OpenAI JSON,
tool calls the worker parsed out included (`message.tool_calls`, `finish_reason: "tool_calls"`).
`SentText` tracks what a stream has sent, so its end can carry whatever token events did not bring.

Limits: `n` choices share one prompt; a choice's logprobs cover its own tokens only. A stream streams the raw text
(tool-call markup included) as content; for a chat request that declared tools, the finish reasons and the parsed
tool calls come in the last chunk, from the stored result (only the finished answer tells whether it was a call).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.audit import ReadPurpose, checkpoint_read
from api.db.models import Checkpoint, ModelAlias, TrainingRun
from api.deps import AppState
from api.errors import APIError, ErrorCode
from api.images import prepare_messages
from api.openai_compat.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, Usage
from api.paths import parse_tinker_path, readable_checkpoint
from contract.broker import TokenEvent
from contract.catalogue import BaseModelEntry
from contract.jobs import ChatPrompt, CompletionPrompt, OpenAIChoice, OpenAIPrompt, OpenAISampleResult, SampleJob
from contract.settings import Settings
from loom.types import SamplingParams


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    base_model: str
    storage_uri: str | None


def model_not_found(name: str) -> APIError:
    return APIError(
        404, ErrorCode.MODEL_NOT_FOUND, f"The model `{name}` does not exist or you do not have access to it.", "model"
    )


def resolve_model(state: AppState, session: Session, owner: str, name: str) -> ResolvedModel:
    path = name
    alias = session.scalar(select(ModelAlias).where(ModelAlias.owner == owner, ModelAlias.name == name))
    if alias is not None:
        path = alias.tinker_path
    if path.startswith("tinker://"):
        try:
            checkpoint = readable_checkpoint(session, owner, parse_tinker_path(path, "model"))
        except APIError as exc:
            raise model_not_found(name) from exc
        checkpoint_read(session, checkpoint, owner, ReadPurpose.SAMPLING)
        run = session.get(TrainingRun, checkpoint.run_id)
        return ResolvedModel(name, run.base_model, checkpoint.storage_uri)
    entry = state.catalogue.resolve(name)
    if entry is None:
        raise model_not_found(name)
    return ResolvedModel(name, entry.name, None)


def sample_job(
    request: ChatCompletionRequest | CompletionRequest, model: ResolvedModel, entry: BaseModelEntry, settings: Settings
) -> SampleJob:
    """The worker's job for an OpenAI request on `model` (whose base model is `entry`); a chat request's images are
    fetched, checked and counted here (`api/images.py`)."""
    prompt: OpenAIPrompt
    if isinstance(request, ChatCompletionRequest):
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        prompt = ChatPrompt(
            messages=prepare_messages(messages, entry.vision, request.model, settings),
            tools=request.tools,
            stream=request.stream,
            top_logprobs=(request.top_logprobs or 1) if request.logprobs else 0,
        )
    else:
        prompt = CompletionPrompt(prompt=request.prompt, stream=request.stream, top_logprobs=request.logprobs or 0)
    params = SamplingParams(
        max_tokens=request.token_limit,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=request.stop,
    )
    return SampleJob(prompt=prompt, sampling_params=params, num_samples=request.n, storage_uri=model.storage_uri)


def usage(result: OpenAISampleResult) -> Usage:
    completion = sum(len(c.tokens) for c in result.choices)
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=completion,
        total_tokens=result.prompt_tokens + completion,
    )


def _chat_logprobs(c: OpenAIChoice, top_n: int | None) -> dict[str, Any]:
    content = []
    for i, (piece, lp) in enumerate(zip(c.token_strs, c.logprobs)):
        alternatives = (c.top_logprobs or [[]] * len(c.tokens))[i][: top_n or 0]
        content.append(
            {
                "token": piece,
                "logprob": lp,
                "bytes": list(piece.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in alternatives],
            }
        )
    return {"content": content}


def _completion_logprobs(c: OpenAIChoice) -> dict[str, Any]:
    offsets, at = [], 0
    for piece in c.token_strs:
        offsets.append(at)
        at += len(piece)
    return {
        "tokens": c.token_strs,
        "token_logprobs": c.logprobs,
        "top_logprobs": [dict(row) for row in c.top_logprobs] if c.top_logprobs else None,
        "text_offset": offsets,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _message(c: OpenAIChoice) -> dict[str, Any]:
    if not c.tool_calls:
        return {"role": "assistant", "content": c.text}
    return {"role": "assistant", "content": c.text or None, "tool_calls": c.tool_calls}


def chat_response(request: ChatCompletionRequest, result: OpenAISampleResult, response_id: str) -> dict[str, Any]:
    choices = []
    for i, c in enumerate(result.choices):
        choices.append(
            {
                "index": i,
                "message": _message(c),
                "finish_reason": c.finish_reason,
                "logprobs": _chat_logprobs(c, request.top_logprobs) if request.logprobs else None,
            }
        )
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": choices,
        "usage": usage(result).model_dump(),
    }


def completion_response(request: CompletionRequest, result: OpenAISampleResult, response_id: str) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "text": c.text,
            "finish_reason": c.finish_reason,
            "logprobs": _completion_logprobs(c) if request.logprobs is not None else None,
        }
        for i, c in enumerate(result.choices)
    ]
    return {
        "id": response_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": choices,
        "usage": usage(result).model_dump(),
    }


def chunk(
    request: ChatCompletionRequest | CompletionRequest,
    response_id: str,
    choices: list[dict[str, Any]],
    usage_: Usage | None = None,
) -> dict[str, Any]:
    """One streamed chunk (`chat.completion.chunk` or `text_completion`), with usage on the final one if asked."""
    kind = "chat.completion.chunk" if isinstance(request, ChatCompletionRequest) else "text_completion"
    return {
        "id": response_id,
        "object": kind,
        "created": int(time.time()),
        "model": request.model,
        "choices": choices,
        **({"usage": usage_.model_dump()} if usage_ is not None else {}),
    }


def holds_finish(request: ChatCompletionRequest | CompletionRequest) -> bool:
    """A chat request that declared tools: its stream's finish reasons wait for the stored result, which alone
    says whether an answer was a tool call."""
    return isinstance(request, ChatCompletionRequest) and bool(request.tools)


def stream_choices(
    request: ChatCompletionRequest | CompletionRequest,
    events: list[TokenEvent],
    result: OpenAISampleResult | None = None,
) -> list[dict]:
    """The choices of one streamed chunk from the token events that arrived since the last one; `result` is given
    for the stream's last chunk (the events `SentText.missing` made), whose choices carry their tool calls.

    Several decode steps can arrive together; OpenAI clients read one entry per choice index per chunk, so the
    events of each index are merged (text and logprobs concatenated, the last finish reason kept).
    """
    merged: dict[int, dict[str, Any]] = {}
    chat = isinstance(request, ChatCompletionRequest)
    hold = result is None and holds_finish(request)
    for event in events:
        entry = merged.setdefault(event["index"], {"text": "", "logprobs": [], "finish_reason": None})
        entry["text"] += event["text"]
        if event["finish_reason"] is not None and not hold:
            entry["finish_reason"] = event["finish_reason"]
        if chat and request.logprobs and event["logprob"] is not None:
            piece = event["token_str"]
            entry["logprobs"].append(
                {"token": piece, "logprob": event["logprob"], "bytes": list(piece.encode()), "top_logprobs": []}
            )
    choices = []
    for index in sorted(merged):
        entry = merged[index]
        if chat:
            logprobs = {"content": entry["logprobs"]} if request.logprobs else None
            delta: dict[str, Any] = {"content": entry["text"]}
            calls = result.choices[index].tool_calls if result is not None else None
            if calls:
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
            choices.append(
                {
                    "index": index,
                    "delta": delta,
                    "finish_reason": entry["finish_reason"],
                    "logprobs": logprobs,
                }
            )
        else:
            choices.append(
                {"index": index, "text": entry["text"], "finish_reason": entry["finish_reason"], "logprobs": None}
            )
    return choices


class SentText:
    """What a stream has sent so far per choice index, to complete it from the stored result; with `hold_finish`
    (see `holds_finish`) no finish is taken as sent, so the result's finish reasons end the stream."""

    def __init__(self, hold_finish: bool = False) -> None:
        self.text: dict[int, str] = {}
        self.finished: set[int] = set()
        self.hold_finish = hold_finish

    def add(self, events: list[TokenEvent]) -> None:
        for event in events:
            self.text[event["index"]] = self.text.get(event["index"], "") + event["text"]
            if event["finish_reason"] is not None and not self.hold_finish:
                self.finished.add(event["index"])

    def missing(self, choices: list[OpenAIChoice]) -> list[TokenEvent]:
        """Token events (no logprobs) carrying each choice's unsent text and finish reason."""
        events: list[TokenEvent] = []
        for index, choice in enumerate(choices):
            sent = self.text.get(index, "")
            rest = choice.text[len(sent) :] if choice.text.startswith(sent) else ""
            if rest or index not in self.finished:
                events.append(
                    TokenEvent(
                        index=index,
                        text=rest,
                        token=None,
                        token_str="",
                        logprob=None,
                        finish_reason=choice.finish_reason,
                    )
                )
        return events


def list_models(state: AppState, session: Session, owner: str) -> list[ModelCard]:
    cards = [
        ModelCard(id=e.name, created=0, owned_by="loom", max_model_len=e.max_context_length)
        for e in state.catalogue.entries.values()
    ]
    checkpoints = session.scalars(
        select(Checkpoint)
        .where(Checkpoint.owner == owner, Checkpoint.committed.is_(True), Checkpoint.ephemeral.is_(False))
        .order_by(Checkpoint.created_at)
    )
    cards += [ModelCard(id=c.tinker_path, created=int(c.created_at.timestamp()), owned_by=owner) for c in checkpoints]
    aliases = session.scalars(select(ModelAlias).where(ModelAlias.owner == owner).order_by(ModelAlias.name))
    cards += [ModelCard(id=a.name, created=int(a.created_at.timestamp()), owned_by=owner) for a in aliases]
    return cards
