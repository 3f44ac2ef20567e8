"""Chat formats, byte for byte: a conversation with a system prompt, tools, an assistant tool call and a tool result
renders, through each base model's own tokenizer and published template, to the layout that model documents
(written out literally here); and the worker's `render_prompt` feeds the model exactly those tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.jobs import ChatPrompt
from worker.models.kimi_tokenizer import load_tokenizer
from worker.openai_jobs import render_prompt

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def _conversation(call_id: str) -> list[dict]:
    return [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": '{"temp_c": 21}'},
    ]


# Kimi K2 (moonshotai/Kimi-K2-Instruct; the layout of its docs/tool_call_guidance.md): tools declared compactly in a
# tool_declare system turn, `<|im_{class}|>{name}<|im_middle|>{body}<|im_end|>` turns, the call section, the tool
# result as "## Return of {id}\n{content}" under the tool's name.
KIMI_EXPECTED = (
    "<|im_system|>tool_declare<|im_middle|>"
    '[{"type":"function","function":{"name":"get_weather","description":"Current weather of a city",'
    '"parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]<|im_end|>'
    "<|im_system|>system<|im_middle|>You are a weather bot.<|im_end|>"
    "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|>"
    '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
    "<|tool_calls_section_end|><|im_end|>"
    '<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n{"temp_c": 21}<|im_end|>'
    "<|im_assistant|>assistant<|im_middle|>"
)

# Qwen3 (Qwen/Qwen3-8B's chat template): tools as JSON lines in <tools></tools> inside the system turn, the call as
# <tool_call>{json}</tool_call>, the result as a user turn wrapping <tool_response>.
QWEN3_EXPECTED = (
    "<|im_start|>system\nYou are a weather bot.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    "<|im_end|>\n"
    '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def kimi(tiny_kimi_folder: Path):
    return load_tokenizer(tiny_kimi_folder)


@pytest.fixture(scope="module")
def qwen3(qwen3_folder: Path):
    return load_tokenizer(qwen3_folder)


def test_kimi_k2_renders_the_documented_layout(kimi) -> None:
    text = kimi.apply_chat_template(
        _conversation("functions.get_weather:0"), tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert text == KIMI_EXPECTED


def test_kimi_k2_adds_its_default_system_prompt(kimi) -> None:
    text = kimi.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>"
    )


def test_render_prompt_gives_kimi_its_own_tool_call_ids(kimi) -> None:
    """A client's own call ids (OpenAI's `call_...`) become `functions.NAME:IDX` in the rendered history."""
    prompt = ChatPrompt(messages=_conversation("call_8f2a"), tools=TOOLS)
    tokens, _ = render_prompt(kimi, prompt, "kimi_k2")
    assert tokens == kimi.encode(KIMI_EXPECTED, add_special_tokens=False)
    assert tokens[:1] == [163594] and tokens[-1] == 163601  # <|im_system|> ... <|im_middle|>
    assert 163595 in tokens and 163597 in tokens  # the call section and call markers are single tokens


def test_qwen3_renders_its_published_layout(qwen3) -> None:
    text = qwen3.apply_chat_template(
        _conversation("call_8f2a"), tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert text == QWEN3_EXPECTED


def test_qwen3_thinking_switch_and_history(qwen3) -> None:
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
    ]
    text = qwen3.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert text == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_render_prompt_feeds_qwen3_its_template_tokens(qwen3) -> None:
    prompt = ChatPrompt(messages=_conversation("call_8f2a"), tools=TOOLS)
    tokens, _ = render_prompt(qwen3, prompt, "qwen3")
    assert tokens == qwen3.encode(QWEN3_EXPECTED, add_special_tokens=False)
    assert tokens.count(151657) == 3 and tokens.count(151658) == 3  # <tool_call> twice in the system turn, once called
