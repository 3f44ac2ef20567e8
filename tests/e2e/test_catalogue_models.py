"""A deployment that serves a model from the operator's catalogue file: a Qwen3-MoE `save_pretrained` folder on
local disk (the built-in miniature's files, copied elsewhere), trained and sampled through the official `tinker`
SDK, and chatted with a tool through the official `openai` client, which reads the trained tool call back as
`tool_calls`."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import tinker
from tinker import types

from contract.catalogue import TINY_QWEN3_MOE
from tests.e2e.server import LoomServer, free_port
from tests.unit.worker_fixtures import MODEL_CACHE
from worker.models.kimi_tokenizer import load_tokenizer
from worker.models.registry import model_dir

pytestmark = pytest.mark.e2e

MODEL = "acme/qwen3-moe-mini"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[tuple[LoomServer, Path]]:
    root = tmp_path_factory.mktemp("catalogue-deployment")
    folder = root / "models" / "qwen3-moe-mini"
    shutil.copytree(model_dir(TINY_QWEN3_MOE, MODEL_CACHE), folder)
    catalogue = root / "catalogue.yaml"
    catalogue.write_text(
        f"builtins: false\nmodels:\n  - id: {MODEL}\n    source: {folder}\n    chat_format: qwen3\n"
        "    aliases: [qwen-mini]\n    max_context_length: 2048\n"
    )
    server = LoomServer(root / "data", free_port(), env_extra={"LOOM_MODEL_CATALOGUE": str(catalogue)})
    (root / "data").mkdir()
    server.start()
    yield server, folder
    server.stop()


def test_capabilities_and_models_show_exactly_the_catalogue(deployment, monkeypatch) -> None:
    server, _ = deployment
    monkeypatch.setenv("TINKER_API_KEY", server.api_key)
    service = tinker.ServiceClient(base_url=server.url)
    models = service.get_server_capabilities().supported_models
    assert [m.model_name for m in models] == [MODEL]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    cards = [m for m in client.models.list().data if m.owned_by == "loom"]
    assert [(m.id, m.max_model_len) for m in cards] == [(MODEL, 2048)]


def test_train_sample_and_chat_with_a_tool(deployment, monkeypatch) -> None:
    server, folder = deployment
    monkeypatch.setenv("TINKER_API_KEY", server.api_key)
    service = tinker.ServiceClient(base_url=server.url)
    training = service.create_lora_training_client(base_model="qwen-mini", rank=16, seed=0)
    tokenizer = training.get_tokenizer()
    server_side = load_tokenizer(folder)
    sample_text = "Paris, 晴天 22°C — 'twas fine!\n\n  def f(x): return x**2 <|im_end|>"
    assert tokenizer.encode(sample_text, add_special_tokens=False) == server_side.encode(
        sample_text, add_special_tokens=False
    )

    prompt = server_side.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    answer = tokenizer.encode(CALL, add_special_tokens=False) + [server_side.convert_tokens_to_ids("<|im_end|>")]
    tokens = prompt + answer
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0] * (len(prompt) - 1) + [1.0] * len(answer)},
    )
    losses = []
    for _ in range(30):
        fb = training.forward_backward([datum], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=2e-2)).result()
        losses.append(fb.result().metrics["loss:sum"])
    assert losses[-1] < losses[0] / 20, losses

    path = training.save_weights_for_sampler(name="tool-caller").result().path
    sampler = service.create_sampling_client(model_path=path)
    sampled = sampler.sample(
        types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=len(answer) + 4, temperature=0.0)
    ).result()
    assert sampled.sequences[0].tokens[: len(answer)] == answer

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    reply = client.chat.completions.create(
        model=path, messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=len(answer) + 4
    )
    assert reply.usage.prompt_tokens == len(prompt)  # the tools were rendered into the prompt
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
