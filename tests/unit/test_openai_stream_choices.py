"""Streamed chunks: events of several decode steps that arrive together become one entry per choice index."""

from __future__ import annotations

from api.openai_compat.protocol import ChatCompletionRequest, CompletionRequest
from api.openai_compat.service import stream_choices


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
