"""Clients with no hub access load exactly the server's tokenizer, from the server.

- The official tinker SDK, unmodified, in a fresh process with `HF_ENDPOINT=<server>/hf` and an empty Hugging Face
  cache: `get_info` names the public model id as `tokenizer_id`, and the training and sampling clients'
  `get_tokenizer()` encode and render chats exactly as the server's own tokenizer, for SmolLM2 and for the Kimi K2
  miniature (tiktoken-based on the server). The `HF_TOKEN` huggingface_hub sends is ignored and never logged.
- `hf download` through the same routes fetches exactly the listed files, and a tokenizer loaded once with
  `HF_ENDPOINT` set leaves a Hub cache that `HF_HUB_OFFLINE=1` tools then load it from.
- Loom's SDK downloads the tokenizer once per revision into its own cache and loads it from there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import loom
from contract.catalogue import SMOLLM2, TINY_KIMI_K2
from tests.e2e.hub_tokenizers import fill_hub_cache, hub_env
from tests.e2e.server import LoomServer
from tests.unit.worker_fixtures import MODEL_CACHE
from worker.models.kimi_tokenizer import load_tokenizer
from worker.models.registry import model_dir

pytestmark = pytest.mark.e2e

TEXTS = [
    "Hello world! It's 22°C in 北京 — isn't it?\n\n\tdef f(x):\n        return x ** 2  # 🙂",
    "<|im_start|>user\nwhat?<|im_end|>\n<|im_user|>user<|im_middle|>天气怎么样？<|im_end|>",
]
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
HF_TOKEN = "hf_a_hugging_face_token_loom_must_ignore"
RESOLVE_ROUTE = "/hf/{repo_id:path}/resolve/{revision}/{filename:path}"
FILES_ROUTE = "/api/v1/tokenizers/{base_model:path}/files/{filename}"

OFFICIAL_SDK = """
import json, sys
import tinker

texts, messages = json.loads(sys.argv[1]), json.loads(sys.argv[2])
service = tinker.ServiceClient()
out = {}
for model in sys.argv[3:]:
    training = service.create_lora_training_client(base_model=model, rank=4).result()
    sampler = service.create_sampling_client(base_model=model).result()
    out[model] = {"tokenizer_id": training.get_info().model_data.tokenizer_id}
    for name, tokenizer in (("training", training.get_tokenizer()), ("sampling", sampler.get_tokenizer())):
        out[model][name] = {
            "ids": [tokenizer.encode(text, add_special_tokens=False) for text in texts],
            "chat": tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        }
print(json.dumps(out))
"""

OFFLINE_LOAD = """
import json, sys
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
print(json.dumps([tokenizer.encode(text, add_special_tokens=False) for text in json.loads(sys.argv[1])]))
"""


def server_side(entry) -> tuple[list[list[int]], str]:
    """What the server's own tokenizer (as its workers load it) makes of `TEXTS` and `MESSAGES`."""
    tokenizer = load_tokenizer(model_dir(entry, MODEL_CACHE))
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    return ids, tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def access_lines(server: LoomServer) -> list[dict]:
    return [json.loads(line) for line in server.access_log_path.read_text().splitlines()]


def test_the_official_sdk_loads_the_servers_tokenizers_through_hf_endpoint(server: LoomServer, tmp_path) -> None:
    env = hub_env(
        server.url,
        HF_HOME=str(tmp_path / "hf-home"),  # an empty cache: every file comes from the server
        HF_TOKEN=HF_TOKEN,
        TINKER_BASE_URL=server.url,
        TINKER_API_KEY=server.api_key,
    )
    done = subprocess.run(
        [sys.executable, "-c", OFFICIAL_SDK, json.dumps(TEXTS), json.dumps(MESSAGES), SMOLLM2.name, TINY_KIMI_K2.name],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for entry in (SMOLLM2, TINY_KIMI_K2):
        ids, chat = server_side(entry)
        assert got[entry.name]["tokenizer_id"] == entry.name
        for client in ("training", "sampling"):
            assert got[entry.name][client] == {"ids": ids, "chat": chat}, (entry.name, client)

    hub_requests = [line for line in access_lines(server) if line["route"] == RESOLVE_ROUTE]
    assert {line["path"].split("/resolve/")[0] for line in hub_requests} >= {
        f"/hf/{SMOLLM2.name}",
        f"/hf/{TINY_KIMI_K2.name}",
    }
    assert all(line["tenant"] == "-" and line["status"] in (200, 404) for line in hub_requests)
    assert HF_TOKEN not in server.log_path.read_text() and HF_TOKEN not in server.access_log_path.read_text()


def test_hf_download_and_an_offline_cache(server: LoomServer, tmp_path) -> None:
    """`hf download` gets exactly the listed files; loading once online (`fill_hub_cache`) leaves a cache from which
    an `HF_HUB_OFFLINE=1` process loads the tokenizer by its id."""
    cache = tmp_path / "hub-cache"
    download = subprocess.run(
        [str(Path(sys.executable).with_name("hf")), "download", SMOLLM2.name, "--cache-dir", str(cache)],
        env=hub_env(server.url),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert download.returncode == 0, download.stderr[-4000:]
    listing = httpx.get(f"{server.url}/api/v1/tokenizers/{SMOLLM2.name}").json()
    snapshot = cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / listing["revision"]
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(f["name"] for f in listing["files"])

    fill_hub_cache(server.url, SMOLLM2.name, cache)
    unreachable = "http://127.0.0.1:9"  # offline, and no server to fall back on
    offline = hub_env(unreachable, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    loaded = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD, json.dumps(TEXTS), SMOLLM2.name],
        env=offline,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == server_side(SMOLLM2)[0]


def test_loom_sdk_downloads_a_revision_once_and_loads_it_from_its_cache(
    server: LoomServer, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_TOKENIZER_CACHE", str(tmp_path / "loom-cache"))
    listing = httpx.get(f"{server.url}/api/v1/tokenizers/{TINY_KIMI_K2.name}").json()
    ids, chat = server_side(TINY_KIMI_K2)
    with loom.ServiceClient(base_url=server.url, api_key=server.api_key) as service:
        training = service.create_lora_training_client(TINY_KIMI_K2.name, rank=4)
        tokenizer = training.get_tokenizer()
        assert [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS] == ids
        assert tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == chat
        cached = tmp_path / "loom-cache" / listing["revision"]
        assert sorted(p.name for p in cached.iterdir()) == sorted(f["name"] for f in listing["files"])

        fetched = len([line for line in access_lines(server) if line["route"] == FILES_ROUTE])
        sampler = service.create_sampling_client(base_model=TINY_KIMI_K2.name)
        assert sampler.get_tokenizer().encode(TEXTS[1], add_special_tokens=False) == ids[1]
        assert len([line for line in access_lines(server) if line["route"] == FILES_ROUTE]) == fetched
