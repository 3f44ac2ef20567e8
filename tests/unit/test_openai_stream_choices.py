"""Streamed chunks: events of several decode steps that arrive together become one entry per choice index; a
stream whose token events were cut short (or never came) is completed from the stored result; the stream hub
yields an empty list while idle, so the caller can look for a finish whose signal was lost."""

from __future__ import annotations

import asyncio

from api.openai_compat.protocol import ChatCompletionRequest, CompletionRequest
from api.openai_compat.service import SentText, stream_choices
from api.queue import StreamHub
from contract.jobs import OpenAIChoice


def _event(index: int, text: str, finish: str | None = None, logprob: float = -0.5) -> dict:
    return {"index": index, "text": text, "token_str": text or "</s>", "logprob": logprob, "finish_reason": finish}


def test_steps_arriving_together_merge_per_index_and_keep_the_finish_reason() -> None:
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=2, logprobs=True)
    events = [_event(0, "Red"), _event(1, "Blue"), _event(0, ", green"), _event(1, "", "length"), _event(0, "", "stop")]
    choices = stream_choices(request, events)
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["delta"]["content"] for c in choices] == ["Red, green", "Blue"]
    assert [c["finish_reason"] for c in choices] == ["stop", "length"]
    assert [t["token"] for t in choices[0]["logprobs"]["content"]] == ["Red", ", green", "</s>"]


def test_completion_chunks_carry_text_and_no_logprobs_when_not_asked() -> None:
    request = CompletionRequest(model="m", prompt="hi")
    choices = stream_choices(request, [_event(0, "a"), _event(0, "b", "length")])
    assert choices == [{"index": 0, "text": "ab", "finish_reason": "length", "logprobs": None}]


def test_whole_choices_without_token_logprobs_give_empty_logprob_lists() -> None:
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], logprobs=True)
    (choice,) = stream_choices(
        request, [{"index": 0, "text": "all", "token_str": "", "logprob": None, "finish_reason": "stop"}]
    )
    assert choice["delta"]["content"] == "all" and choice["logprobs"] == {"content": []}


def _choice(text: str, finish_reason: str) -> OpenAIChoice:
    return OpenAIChoice(text=text, finish_reason=finish_reason, tokens=[], token_strs=[], logprobs=[])


def test_a_stream_cut_short_is_completed_from_the_result() -> None:
    sent = SentText()
    sent.add([_event(0, "Red"), _event(1, "Blue"), _event(1, " sky", "stop"), _event(0, ", gr")])
    result = [_choice("Red, green", "length"), _choice("Blue sky", "stop")]
    missing = sent.missing(result)
    assert [(e["index"], e["text"], e["finish_reason"]) for e in missing] == [(0, "een", "length")]
    assert SentText().missing(result) == [  # nothing streamed: each choice whole
        {"index": i, "text": c.text, "token": None, "token_str": "", "logprob": None, "finish_reason": c.finish_reason}
        for i, c in enumerate(result)
    ]
    sent.add(missing)
    assert sent.missing(result) == []


def test_an_idle_stream_yields_empty_lists_until_events_or_the_finish() -> None:
    async def read() -> list[list[dict]]:
        hub, got = StreamHub(), []
        async for events in hub.subscribe("job", idle_seconds=0.05):
            got.append(events)
            if len(got) == 2:
                hub.publish("job", [_event(0, "a")])
            if len(got) == 3:
                hub.finish(["job"])
        return got

    got = asyncio.run(asyncio.wait_for(read(), 10))
    assert got[:3] == [[], [], [_event(0, "a")]] and all(g == [] for g in got[3:])
