"""Tool calls in a base model's chat format: parsed out of a completion into OpenAI `tool_calls`, and (Kimi K2)
given the ids the model was trained on before a conversation is rendered.

Chat formats (a catalogue entry's `chat_format`):
- "kimi_k2": `<|tool_calls_section_begin|>` then, per call, `<|tool_call_begin|>functions.NAME:IDX
  <|tool_call_argument_begin|>ARGS<|tool_call_end|>`, then `<|tool_calls_section_end|>`; the call's id is
  `functions.NAME:IDX` (Moonshot's tool_call_guidance.md). Kimi K2 expects every call in the history to carry such
  an id (MoonshotAI/K2-Vendor-Verifier); `kimi_k2_history` renames the others `functions.NAME:<position of the
  call in the conversation>`, and the tool results that answer them.
- "qwen3": each call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen3's chat template);
  ids are made up (`call_` + 24 hex digits), as OpenAI's are.
- "template": the tokenizer's own template; nothing is parsed.

A call that does not parse (an id not of the `NAME:IDX` form, arguments that are not a JSON object, a missing
name, an unclosed block) stays in the text. Kimi K2's section is all or nothing: one bad call keeps the whole
section as text. The returned content is the text outside the parsed calls, stripped when there were calls.

Limits: no streaming (calls are parsed from the finished text); Qwen3's `<think>` blocks stay in the content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CHAT_FORMATS = ("kimi_k2", "qwen3", "template")

_KIMI_SECTION = re.compile(r"<\|tool_calls_section_begin\|>(.*?)<\|tool_calls_section_end\|>", re.DOTALL)
_KIMI_CALL = re.compile(
    r"\s*<\|tool_call_begin\|>\s*(?P<id>[^<\s]*?(?P<name>[^.<\s:]+):\d+)\s*<\|tool_call_argument_begin\|>"
    r"(?P<args>.*?)<\|tool_call_end\|>\s*",
    re.DOTALL,
)
_KIMI_ID = re.compile(r"functions\.[^.<\s:]+:\d+")
_QWEN_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ParsedReply:
    """A completion's text outside its tool calls, and the calls as OpenAI `tool_calls` entries."""

    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _kimi_section(section: str) -> list[dict[str, Any]] | None:
    """The calls of a Kimi K2 tool-calls section, or None when any part of it is not a well-formed call."""
    calls, at = [], 0
    while at < len(section):
        match = _KIMI_CALL.match(section, at)
        if match is None or _json_object(match["args"]) is None:
            return None
        calls.append(_call(match["id"], match["name"], match["args"].strip()))
        at = match.end()
    return calls or None


def parse_kimi_k2(text: str) -> ParsedReply:
    content, calls, at = [], [], 0
    for match in _KIMI_SECTION.finditer(text):
        parsed = _kimi_section(match[1])
        if parsed is None:
            continue
        content.append(text[at : match.start()])
        calls += parsed
        at = match.end()
    content.append(text[at:])
    return ParsedReply("".join(content).strip() if calls else text, calls)


def _qwen_call(body: str) -> dict[str, Any] | None:
    value = _json_object(body.strip())
    if value is None or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        arguments = _json_object(arguments)
    if not isinstance(arguments, dict):
        return None
    return _call(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(arguments, ensure_ascii=False))


def parse_qwen3(text: str) -> ParsedReply:
    content, calls, at = [], [], 0
    for match in _QWEN_CALL.finditer(text):
        call = _qwen_call(match[1])
        if call is None:
            continue
        content.append(text[at : match.start()])
        calls.append(call)
        at = match.end()
    content.append(text[at:])
    return ParsedReply("".join(content).strip() if calls else text, calls)


_PARSERS: dict[str, Callable[[str], ParsedReply]] = {"kimi_k2": parse_kimi_k2, "qwen3": parse_qwen3}


def parse_reply(chat_format: str, text: str) -> ParsedReply:
    """`text` split into content and tool calls by `chat_format`'s parser ("template": all content)."""
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {chat_format!r}; known: {CHAT_FORMATS}")
    parser = _PARSERS.get(chat_format)
    return parser(text) if parser else ParsedReply(text)


def kimi_k2_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with every assistant tool call's id in Kimi's `functions.NAME:IDX` form (ids already of that
    form are kept; the others become `functions.NAME:<call's position in the conversation>`), and each tool result's
    `tool_call_id` following its call's new id."""
    renamed: dict[str, str] = {}
    position = 0
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls:
            new_calls = []
            for call in calls:
                old, name = call.get("id"), call["function"]["name"]
                new = old if isinstance(old, str) and _KIMI_ID.fullmatch(old) else f"functions.{name}:{position}"
                if isinstance(old, str):
                    renamed[old] = new
                new_calls.append({**call, "id": new})
                position += 1
            message = {**message, "tool_calls": new_calls}
        elif message.get("role") == "tool" and message.get("tool_call_id") in renamed:
            message = {**message, "tool_call_id": renamed[message["tool_call_id"]]}
        out.append(message)
    return out
