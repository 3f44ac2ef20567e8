"""OpenAI-style sample jobs on the worker: render the prompt with the base model's own tokenizer and chat
template, and turn sampled rows into choices (stop strings cut off, per-token logprobs with token text, tool calls
parsed out in the model's chat format).

The API forwards the OpenAI request as the `SampleJob`'s `ChatPrompt` (messages and tools) or `CompletionPrompt`
(text or token ids); sampling parameters travel in the job's `sampling_params`. A model's chat format
(`worker/models/tool_calls.py`: "kimi_k2", "qwen3" or "template") says how its history's tool calls are rewritten
before rendering and how tool calls are read back out of a completion.

Limits: message content must be text (image parts wait for the vision base models); tool calls are parsed only
from the answers to chat prompts that declared tools, and only in the "kimi_k2" and "qwen3" formats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from contract.jobs import ChatPrompt, CompletionPrompt, OpenAIChoice, OpenAIPrompt
from worker.models.tool_calls import kimi_k2_history, parse_reply
from worker.sampler import SampledSequence
from worker.text_stream import TextStream


class PromptError(ValueError):
    """The messages cannot be rendered for this model (a user error)."""


def _text_content(message: Mapping[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.get("type") != "text":
                raise PromptError(f"content part type {part.get('type')!r} is not supported by this text-only model")
            parts.append(part.get("text", ""))
        content = "".join(parts)
    return {**message, "content": content if content is not None else ""}


def render_prompt(tokenizer, prompt: OpenAIPrompt, chat_format: str = "template") -> list[int]:
    if isinstance(prompt, CompletionPrompt):
        text = prompt.prompt
        return list(text) if isinstance(text, list) else tokenizer.encode(text, add_special_tokens=False)
    if not tokenizer.chat_template:
        raise PromptError("this base model has no chat template; use /v1/completions")
    messages = [_text_content(m) for m in prompt.messages]
    if chat_format == "kimi_k2":
        messages = kimi_k2_history(messages)
    encoded = tokenizer.apply_chat_template(
        messages, tools=prompt.tools or None, add_generation_prompt=True, tokenize=True
    )
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def reply_format(prompt: OpenAIPrompt, chat_format: str) -> str:
    """The chat format to parse an answer to `prompt` in: the model's for a chat prompt that declared tools,
    "template" (no parsing) otherwise."""
    return chat_format if isinstance(prompt, ChatPrompt) and prompt.tools else "template"


def choice(tokenizer, seq: SampledSequence, stream: TextStream, chat_format: str = "template") -> OpenAIChoice:
    """One finished sequence as an OpenAI-neutral choice record (the API shapes the final JSON); its tool calls
    are parsed out in `chat_format` (see `reply_format`)."""
    stream.finish()
    finish = "stop" if seq.stop_reason == "stop" or stream.stopped else "length"
    reply = parse_reply(chat_format, stream.text)
    pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in seq.tokens]
    top = None
    if seq.top_logprobs is not None:
        top = [[(tokenizer.decode([i], skip_special_tokens=False), lp) for i, lp in row] for row in seq.top_logprobs]
    return OpenAIChoice(
        text=reply.content,
        finish_reason="tool_calls" if reply.tool_calls else finish,
        tool_calls=reply.tool_calls or None,
        tokens=seq.tokens,
        token_strs=pieces,
        logprobs=seq.logprobs,
        top_logprobs=top,
    )
