"""A deployment that serves a model from the operator's catalogue file: a Qwen3-MoE `save_pretrained` folder on
local disk (the built-in miniature's files, copied elsewhere), trained and sampled through the official `tinker`
SDK, and chatted with a tool through the official `openai` client, which reads the trained tool call back as
`tool_calls`; and the built-in Kimi K2 miniature's tokenizer and chat format as the SDKs see them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import tinker
from tinker import types

from contract.catalogue import TINY_KIMI_K2, TINY_QWEN3_MOE
from tests.e2e.hub_tokenizers import hub_tokenizer
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
    models = tinker.RestClient(base_url=server.url).get_server_capabilities().result().supported_models
    assert [m.model_name for m in models] == [MODEL]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    cards = [m for m in client.models.list().data if m.owned_by == "loom"]
    assert [(m.id, m.max_model_len) for m in cards] == [(MODEL, 2048)]


def test_train_sample_and_chat_with_a_tool(deployment, monkeypatch, tmp_path: Path) -> None:
    server, folder = deployment
    monkeypatch.setenv("TINKER_API_KEY", server.api_key)
    service = tinker.ServiceClient(base_url=server.url)
    training = service.create_lora_training_client(base_model="qwen-mini", rank=16, seed=0).result()
    assert training.get_info().model_data.tokenizer_id == MODEL
    tokenizer = hub_tokenizer(server.url, MODEL, tmp_path / "hf-cache")
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
    for _ in range(80):
        fb = training.forward_backward([datum], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=2e-3)).result()
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


def test_tiny_kimi_k2_tokenizer_and_chat_format_through_the_sdks(tinker_env, tokenizer_of) -> None:
    """The tokenizer a Hub client gets from the server (what the official SDK's `get_tokenizer()` loads with
    `HF_ENDPOINT` set) encodes exactly as the server's tiktoken-based Kimi tokenizer, and the OpenAI endpoint
    renders Kimi's chat layout, tools included."""
    server = tinker_env
    training = tinker.ServiceClient().create_lora_training_client(base_model=TINY_KIMI_K2.name, rank=4).result()
    assert training.get_info().model_data.tokenizer_id == TINY_KIMI_K2.name
    theirs = tokenizer_of(TINY_KIMI_K2.name)
    ours = load_tokenizer(model_dir(TINY_KIMI_K2, MODEL_CACHE))
    text = "<|im_user|>user<|im_middle|>天气怎么样？ It's 22°C —\n\n  x = [1, 22, 333, 4444]<|im_end|>"
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False)
    prompt = ours.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_system|>tool_declare<|im_middle|>[{") and prompt.endswith(
        "<|im_user|>user<|im_middle|>What is the weather in Paris?<|im_end|><|im_assistant|>assistant<|im_middle|>"
    )
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)
    reply = client.chat.completions.create(
        model=TINY_KIMI_K2.name, messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=4
    )
    assert reply.usage.prompt_tokens == len(ours.encode(prompt, add_special_tokens=False))


def test_a_damaged_model_folder_stops_loom_serve_with_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(model_dir(TINY_QWEN3_MOE, MODEL_CACHE), folder)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    catalogue = tmp_path / "catalogue.yaml"
    catalogue.write_text(f"builtins: false\nmodels:\n  - id: acme/broken\n    source: {folder}\n")
    (tmp_path / "data").mkdir()
    server = LoomServer(tmp_path / "data", free_port(), env_extra={"LOOM_MODEL_CATALOGUE": str(catalogue)})
    with pytest.raises(RuntimeError, match="exited early"):
        server.start()
    assert server.process.returncode == 1
    last = server.log_path.read_text().strip().splitlines()[-1]
    assert last.startswith(f"loom: {shard}: missing; model.safetensors.index.json places")
