"""Tool calls parsed out of completions per chat format (Kimi K2's call section, Qwen3's <tool_call> blocks), the
ids Kimi's history is given, and the OpenAI shapes they take: the worker's choice record, the chat response's
`message.tool_calls` with `finish_reason: "tool_calls"`, and a stream's last chunk."""

from __future__ import annotations

import json
import re

import pytest

from api.openai_compat.protocol import ChatCompletionRequest
from api.openai_compat.service import SentText, chat_response, stream_choices
from contract.jobs import ChatPrompt, CompletionPrompt, OpenAIChoice, OpenAISampleResult
from worker.models.tool_calls import kimi_k2_history, parse_kimi_k2, parse_qwen3, parse_reply
from worker.openai_jobs import choice, reply_format
from worker.sampler import SampledSequence
from worker.text_stream import TextStream

KIMI_CALL = (
    "<|tool_calls_section_begin|>"
    '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
    '<|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{"tz": "CET"}<|tool_call_end|>'
    "<|tool_calls_section_end|>"
)
QWEN_ID = re.compile(r"call_[0-9a-f]{24}")


def _fn(call: dict) -> tuple[str, str, dict]:
    return call["type"], call["function"]["name"], json.loads(call["function"]["arguments"])


def test_kimi_k2_calls_are_parsed_with_their_ids_and_the_text_before_them() -> None:
    reply = parse_kimi_k2("Let me check. " + KIMI_CALL)
    assert reply.content == "Let me check."
    assert [c["id"] for c in reply.tool_calls] == ["functions.get_weather:0", "functions.get_time:1"]
    assert [_fn(c) for c in reply.tool_calls] == [
        ("function", "get_weather", {"city": "Paris"}),
        ("function", "get_time", {"tz": "CET"}),
    ]
    assert reply.tool_calls[0]["function"]["arguments"] == '{"city": "Paris"}'  # the model's JSON text, as given


def test_kimi_k2_tolerates_whitespace_and_an_id_without_the_functions_prefix() -> None:
    text = '<|tool_calls_section_begin|>\n<|tool_call_begin|> search:3 <|tool_call_argument_begin|> {"q": "x"} <|tool_call_end|>\n<|tool_calls_section_end|>'
    reply = parse_kimi_k2(text)
    assert reply.content == "" and reply.tool_calls[0]["id"] == "search:3"
    assert _fn(reply.tool_calls[0]) == ("function", "search", {"q": "x"})


@pytest.mark.parametrize(
    "text",
    [
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{bad json<|tool_call_end|><|tool_calls_section_end|>",
        '<|tool_calls_section_begin|><|tool_call_begin|>functions.f<|tool_call_argument_begin|>{"a": 1}<|tool_call_end|><|tool_calls_section_end|>',
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>[1, 2]<|tool_call_end|><|tool_calls_section_end|>",
        '<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"a": 1}<|tool_call_end|>',
        '<|tool_calls_section_begin|>chatter<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"a": 1}<|tool_call_end|><|tool_calls_section_end|>',
        'Hello <|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"a": 1}<|tool_call_end|>',
    ],
    ids=["bad-json", "no-index", "not-an-object", "unclosed-section", "text-in-section", "no-section"],
)
def test_malformed_kimi_k2_calls_stay_text(text: str) -> None:
    assert parse_kimi_k2(text) == parse_reply("template", text)
    assert parse_kimi_k2(text).content == text and parse_kimi_k2(text).tool_calls == []


def test_qwen3_calls_are_parsed_and_given_openai_style_ids() -> None:
    text = (
        "Checking both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>'
    )
    reply = parse_qwen3(text)
    assert reply.content == "Checking both."
    assert [_fn(c) for c in reply.tool_calls] == [
        ("function", "get_weather", {"city": "Paris"}),
        ("function", "get_time", {"tz": "CET"}),
    ]
    ids = [c["id"] for c in reply.tool_calls]
    assert all(QWEN_ID.fullmatch(i) for i in ids) and len(set(ids)) == 2


def test_malformed_qwen3_calls_stay_text_while_good_ones_parse() -> None:
    good = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    bad = ['<tool_call>\n{"name": "f", "arguments": {oops}\n</tool_call>', '<tool_call>{"arguments": {}}</tool_call>']
    reply = parse_qwen3(bad[0] + good + bad[1])
    assert reply.content == bad[0] + bad[1]
    assert [_fn(c) for c in reply.tool_calls] == [("function", "f", {})]
    assert parse_qwen3("<tool_call>{").tool_calls == []


def test_the_template_format_parses_nothing_and_unknown_formats_are_refused() -> None:
    assert parse_reply("template", KIMI_CALL).content == KIMI_CALL
    assert parse_reply("kimi_k2", KIMI_CALL).tool_calls
    with pytest.raises(ValueError, match="chat format"):
        parse_reply("harmony", "x")


def test_kimi_k2_history_gives_calls_kimi_ids_and_results_follow() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "functions.g:7", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "1"},
        {"role": "tool", "tool_call_id": "functions.g:7", "content": "2"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "x", "content": "3"},
    ]
    out = kimi_k2_history(messages)
    assert [c["id"] for c in out[1]["tool_calls"]] == ["functions.f:0", "functions.g:7"]
    assert [m.get("tool_call_id") for m in out[2:4]] == ["functions.f:0", "functions.g:7"]
    assert out[4]["tool_calls"][0]["id"] == "functions.f:2" and out[5]["tool_call_id"] == "functions.f:2"
    assert messages[1]["tool_calls"][0]["id"] == "call_a"  # the caller's messages are left alone


class _Pieces:
    """A stand-in tokenizer whose token i decodes to PIECES[i]."""

    PIECES = ["Let me check. ", KIMI_CALL, "<EOS>"]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.PIECES[i] for i in ids if not (skip_special_tokens and i == 2))


def _choice(chat_format: str) -> OpenAIChoice:
    tokenizer = _Pieces()
    stream = TextStream(tokenizer, [])
    for token in (0, 1, 2):
        stream.push(token)
    return choice(tokenizer, SampledSequence([0, 1, 2], [-0.1, -0.2, -0.3], "stop"), stream, chat_format)


def test_the_worker_choice_carries_parsed_calls_and_the_tool_calls_finish() -> None:
    parsed = _choice("kimi_k2")
    assert parsed.text == "Let me check." and parsed.finish_reason == "tool_calls"
    assert [c["id"] for c in parsed.tool_calls] == ["functions.get_weather:0", "functions.get_time:1"]
    plain = _choice("template")
    assert plain.text == "Let me check. " + KIMI_CALL and plain.finish_reason == "stop" and plain.tool_calls is None
    assert OpenAIChoice.model_validate(parsed.model_dump(mode="json")) == parsed  # it travels as JSON


def test_answers_are_parsed_only_for_chat_prompts_that_declared_tools() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert reply_format(ChatPrompt(messages=[], tools=tools), "qwen3") == "qwen3"
    assert reply_format(ChatPrompt(messages=[]), "qwen3") == "template"
    assert reply_format(CompletionPrompt(prompt="x"), "kimi_k2") == "template"


def _request(**fields) -> ChatCompletionRequest:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools, **fields)


def test_the_chat_response_has_message_tool_calls_and_a_null_content_when_only_calls() -> None:
    calls = parse_kimi_k2(KIMI_CALL).tool_calls
    result = OpenAISampleResult(
        prompt_tokens=3,
        choices=[
            OpenAIChoice(
                text="", finish_reason="tool_calls", tool_calls=calls, tokens=[1], token_strs=["x"], logprobs=[-1.0]
            ),
            OpenAIChoice(text="Sunny.", finish_reason="stop", tokens=[2], token_strs=["y"], logprobs=[-1.0]),
        ],
    )
    body = chat_response(_request(n=2), result, "chatcmpl-1")
    first, second = body["choices"]
    assert first["finish_reason"] == "tool_calls"
    assert first["message"] == {"role": "assistant", "content": None, "tool_calls": calls}
    assert second["message"] == {"role": "assistant", "content": "Sunny."} and second["finish_reason"] == "stop"


def test_a_tool_stream_ends_with_the_results_finish_and_tool_calls() -> None:
    request = _request(stream=True)
    events = [
        {"index": 0, "text": "Let me check. ", "token_str": "a", "logprob": -0.1, "finish_reason": None},
        {"index": 0, "text": KIMI_CALL, "token_str": "b", "logprob": -0.1, "finish_reason": "stop"},
    ]
    (streamed,) = stream_choices(request, events)
    assert streamed["delta"] == {"content": "Let me check. " + KIMI_CALL} and streamed["finish_reason"] is None
    sent = SentText(hold_finish=True)
    sent.add(events)
    calls = parse_kimi_k2(KIMI_CALL).tool_calls
    result = OpenAISampleResult(
        prompt_tokens=3,
        choices=[
            OpenAIChoice(
                text="Let me check.",
                finish_reason="tool_calls",
                tool_calls=calls,
                tokens=[0, 1],
                token_strs=["a", "b"],
                logprobs=[-0.1, -0.1],
            )
        ],
    )
    (last,) = stream_choices(request, sent.missing(result.choices), result)
    assert last["finish_reason"] == "tool_calls"
    assert last["delta"] == {"content": "", "tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
