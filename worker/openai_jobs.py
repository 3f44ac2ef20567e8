"""OpenAI-style sample jobs on the worker: render the prompt with the base model's own tokenizer and chat
template, and turn sampled rows into choices (stop strings cut off, per-token logprobs with token text, tool calls
parsed out in the model's chat format).

The API forwards the OpenAI request as the `SampleJob`'s `ChatPrompt` (messages and tools) or `CompletionPrompt`
(text or token ids); sampling parameters travel in the job's `sampling_params`. A model's chat format
(`worker/models/tool_calls.py`: "kimi_k2", "qwen3" or "template") says how its history's tool calls are rewritten
before rendering and how tool calls are read back out of a completion.

A vision model's messages may hold image parts (`{"type": "image", "image": <ImageChunk>}`, as the API rewrites
OpenAI `image_url` parts after checking and counting the images): the chat template places one image token per
image, which is widened here to the image's run of image tokens.

Limits: a text model's message content must be text; tool calls are parsed only from the answers to chat prompts
that declared tools, and only in the "kimi_k2" and "qwen3" formats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from contract.jobs import ChatPrompt, CompletionPrompt, OpenAIChoice, OpenAIPrompt
from loom.types import ImageChunk
from worker.models.tool_calls import kimi_k2_history, parse_reply
from worker.models.vision_inputs import ImageEncoder, VisionImage
from worker.sampler import SampledSequence
from worker.text_stream import TextStream


class PromptError(ValueError):
    """The messages cannot be rendered for this model (a user error)."""


def _message(message: Mapping[str, Any], images: list[ImageChunk] | None) -> dict[str, Any]:
    """A message ready for the chat template: text parts joined for a text model; for a vision model (`images` is
    a list) its image parts kept as `{"type": "image"}` and their images appended to `images`."""
    content = message.get("content")
    if isinstance(content, list):
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type")
            if kind == "image" and images is not None:
                images.append(ImageChunk.model_validate(part["image"]))
                parts.append({"type": "image"})
            elif kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                what = "this text-only model" if images is None else "this model"
                raise PromptError(f"content part type {kind!r} is not supported by {what}")
        content = parts if images is not None else "".join(p["text"] for p in parts)
    return {**message, "content": content if content is not None else ""}


def _widen_images(tokens: list[int], images: list[VisionImage], image_token_id: int) -> list[int]:
    """The template's one image token per image widened to each image's run of image tokens."""
    marks = [i for i, t in enumerate(tokens) if t == image_token_id]
    if len(marks) != len(images):
        raise PromptError(f"the chat template placed {len(marks)} image tokens for {len(images)} images")
    out: list[int] = []
    start = 0
    for mark, image in zip(marks, images):
        out += tokens[start:mark] + [image_token_id] * image.tokens
        start = mark + 1
    return out + tokens[start:]


def render_prompt(
    tokenizer, prompt: OpenAIPrompt, chat_format: str = "template", encoder: ImageEncoder | None = None
) -> tuple[list[int], list[VisionImage]]:
    """The prompt's token ids and, for a vision model (`encoder`), its encoded images in order."""
    if isinstance(prompt, CompletionPrompt):
        text = prompt.prompt
        return (list(text) if isinstance(text, list) else tokenizer.encode(text, add_special_tokens=False)), []
    if not tokenizer.chat_template:
        raise PromptError("this base model has no chat template; use /v1/completions")
    chunks: list[ImageChunk] | None = [] if encoder is not None else None
    messages = [_message(m, chunks) for m in prompt.messages]
    if chat_format == "kimi_k2":
        messages = kimi_k2_history(messages)
    encoded = tokenizer.apply_chat_template(
        messages, tools=prompt.tools or None, add_generation_prompt=True, tokenize=True
    )
    tokens = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    if not chunks:
        return tokens, []
    images = [encoder.encode(chunk) for chunk in chunks]
    return _widen_images(tokens, images, encoder.spec.image_token_id), images


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
