"""The official `openai` client against Loom's OpenAI-compatible endpoint: chat and completions, streaming that
reassembles to the non-streaming answer, stop sequences, logprobs, usage, models, aliases, errors, and answers
that follow training as soon as `save_weights_for_sampler` returns."""

from __future__ import annotations

import httpx
import openai
import pytest
import tinker
from tinker import types

from examples.sl_loop import make_datum
from tests.e2e.wire import SMOL

pytestmark = pytest.mark.e2e

QUESTION = "What is the secret word?"


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)


def ask(client: openai.OpenAI, model: str, content: str, **kw) -> str:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, **kw
    )
    return r.choices[0].message.content


def test_chat_stream_reassembles_to_the_plain_answer(client) -> None:
    messages = [{"role": "user", "content": "Name three colors."}]
    plain = client.chat.completions.create(model=SMOL, messages=messages, max_tokens=20, temperature=0)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert (
        plain.usage.completion_tokens > 0
        and plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    )
    chunks = list(
        client.chat.completions.create(
            model=SMOL,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices]) > 3  # it really streamed, token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        plain.choices[0].finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_with_stop_logprobs_and_n(client) -> None:
    prompt = "1, 2, 3, 4, 5,"
    full = client.completions.create(model=SMOL, prompt=prompt, max_tokens=12, temperature=0)
    assert " 7" in full.choices[0].text
    cut = client.completions.create(model=SMOL, prompt=prompt, max_tokens=12, temperature=0, stop=[" 7"], logprobs=3)
    choice = cut.choices[0]
    assert choice.finish_reason == "stop" and " 7" not in choice.text
    assert full.choices[0].text.startswith(choice.text)
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) and all(
        lp <= 0 for lp in choice.logprobs.token_logprobs
    )
    assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs)
    many = client.completions.create(
        model="loom/tiny-kimi-k2", prompt="Hello", max_tokens=4, n=3, temperature=1.0, seed=5
    )
    assert len(many.choices) == 3 and many.usage.completion_tokens <= 12
    again = client.completions.create(
        model="loom/tiny-kimi-k2", prompt="Hello", max_tokens=4, n=3, temperature=1.0, seed=5
    )
    assert [c.text for c in again.choices] == [c.text for c in many.choices]


def test_chat_logprobs(client) -> None:
    r = client.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)


def test_errors_are_openai_shaped(client, server, other_tenant_key) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        ask(client, "no-such-model", "hi")
    assert unknown.value.body["code"] == "model_not_found" and unknown.value.body["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "x"}], n=64)
    assert too_many.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as long_prompt:
        client.completions.create(model="loom/tiny-kimi-k2", prompt=list(range(5000)), max_tokens=4)
    assert "context" in long_prompt.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="tml-wrong", max_retries=0).models.list()
    response = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {server.api_key}"})
    assert response.headers["x-request-id"]


def train_toward(training, tokenizer, answer: str, max_steps: int = 30) -> float:
    """SL steps on one Q/A pair until the answer's loss per token is below 0.05 (or `max_steps` ran); the last loss."""
    batch = [make_datum(tokenizer, QUESTION, answer)]
    n_tokens = sum(batch[0].loss_fn_inputs["weights"].tolist())
    for _ in range(max_steps):
        loss = training.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"] / n_tokens
        if loss < 0.05:
            return loss
        training.optim_step(types.AdamParams(learning_rate=2e-3)).result()
    return loss


def test_trained_checkpoint_alias_and_live_updates(client, tinker_env, server, other_tenant_key, tokenizer_of) -> None:
    training = tinker.ServiceClient().create_lora_training_client(base_model=SMOL, rank=8, seed=11).result()
    tokenizer = tokenizer_of(SMOL)
    assert "banana" not in ask(client, SMOL, QUESTION, max_tokens=8).lower()
    assert train_toward(training, tokenizer, "banana") < 0.05
    v1 = training.save_weights_for_sampler("openai-v1").result().path
    prompt = f"Q: {QUESTION}\nA:"
    first = client.completions.create(model=v1, prompt=prompt, max_tokens=4, temperature=0).choices[0].text
    assert "banana" in first.lower()

    alias = client._client.put(
        f"{server.url}/api/v1/aliases/my-agent:latest", json={"tinker_path": v1}, headers={"X-API-Key": server.api_key}
    )
    assert alias.status_code == 200
    assert (
        client.completions.create(model="my-agent:latest", prompt=prompt, max_tokens=4, temperature=0).choices[0].text
        == first
    )

    # Keep training toward another answer; the new snapshot serves as soon as its save returns.
    assert train_toward(training, tokenizer, "cherry") < 0.05
    v2 = training.save_weights_for_sampler("openai-v2").result().path
    client._client.put(
        f"{server.url}/api/v1/aliases/my-agent:latest", json={"tinker_path": v2}, headers={"X-API-Key": server.api_key}
    )
    assert (
        "cherry"
        in client.completions.create(model="my-agent:latest", prompt=prompt, max_tokens=4, temperature=0)
        .choices[0]
        .text.lower()
    )
    assert client.completions.create(model=v1, prompt=prompt, max_tokens=4, temperature=0).choices[0].text == first

    ids = [m.id for m in client.models.list().data]
    assert {v1, v2, "my-agent:latest", SMOL} <= set(ids)
    other = openai.OpenAI(base_url=f"{server.url}/v1", api_key=other_tenant_key, max_retries=0)
    assert not {v1, v2, "my-agent:latest"} & {m.id for m in other.models.list().data}
    for foreign in (v1, "my-agent:latest"):
        with pytest.raises(openai.NotFoundError) as caught:
            other.completions.create(model=foreign, prompt=prompt, max_tokens=2)
        assert caught.value.body["code"] == "model_not_found"


def test_concurrent_stream_limit(server) -> None:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    body = {"model": SMOL, "prompt": "Once upon a time", "max_tokens": 200, "stream": True}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(8)]
        opened = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in opened)
            refused = http.post("/v1/completions", json=body)
            assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        finally:
            for s in streams:
                s.__exit__(None, None, None)


def test_tools_and_tool_calls_go_through_the_kimi_template(client) -> None:
    kimi = "loom/tiny-kimi-k2"
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    plain = client.chat.completions.create(model=kimi, messages=messages, max_tokens=2, temperature=0)
    with_tools = client.chat.completions.create(model=kimi, messages=messages, tools=tools, max_tokens=2, temperature=0)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the schema is in the prompt
    turn = messages + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    ]
    follow = client.chat.completions.create(model=kimi, messages=turn, tools=tools, max_tokens=2, temperature=0)
    assert follow.usage.prompt_tokens > with_tools.usage.prompt_tokens
    # SmolLM2's own template has no tool support: the request still works, tools are simply not rendered.
    smol = client.chat.completions.create(model=SMOL, messages=messages, tools=tools, max_tokens=2, temperature=0)
    assert (
        smol.usage.prompt_tokens
        == client.chat.completions.create(
            model=SMOL, messages=messages, max_tokens=2, temperature=0
        ).usage.prompt_tokens
    )
