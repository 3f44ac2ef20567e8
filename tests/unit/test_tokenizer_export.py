"""The tokenizer folder clients get as `tokenizer_id`: a stock `AutoTokenizer` loads it without remote code and
encodes exactly as the server's tokenizer, even for a Kimi K2 folder as Moonshot ships it (`auto_map` to
`tokenization_kimi.py`, no `tokenizer.json`), and it carries the chat template the server renders with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoTokenizer

from worker.models.kimi_tokenizer import KimiTokenizer, load_tokenizer
from worker.models.tokenizer_export import export_tokenizer

TEXTS = [
    "Hello world! It's 22°C in 北京 today — isn't it?\n\n\tdef f(x):\n        return x ** 2  # 🙂",
    "<|im_system|>system<|im_middle|>You are Kimi.<|im_end|><|im_user|>user<|im_middle|>hi<|im_end|>",
    "<|im_start|>user\nwhat?<|im_end|>\n<tool_call>\n{}\n</tool_call>",
]


def _shipped_kimi(tiny_kimi_folder: Path, out: Path) -> Path:
    out.mkdir()
    shutil.copy(tiny_kimi_folder / "tiktoken.model", out)
    config = json.loads((tiny_kimi_folder / "tokenizer_config.json").read_text())
    del config["tokenizer_class"]
    config["auto_map"] = {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}
    config["chat_template"] = "{% for m in messages %}<|im_user|>{{ m['content'] }}<|im_end|>{% endfor %}"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "tokenization_kimi.py").write_text("raise RuntimeError('the folder code must never run')\n")
    (out / "config.json").write_text(json.dumps({"model_type": "kimi_k2", "auto_map": {"AutoConfig": "x.Y"}}))
    return out


def test_a_shipped_kimi_folder_exports_to_a_stock_loadable_tokenizer(tiny_kimi_folder: Path, tmp_path: Path) -> None:
    server = load_tokenizer(_shipped_kimi(tiny_kimi_folder, tmp_path / "kimi"))
    assert isinstance(server, KimiTokenizer)
    client = AutoTokenizer.from_pretrained(str(export_tokenizer(server, tmp_path / "export")))
    for text in TEXTS:
        assert client.encode(text, add_special_tokens=False) == server.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "hi"}]
    assert client.apply_chat_template(messages, tokenize=False) == server.apply_chat_template(messages, tokenize=False)
    assert client.apply_chat_template(messages, tokenize=False) == "<|im_user|>hi<|im_end|>"


def test_a_fast_tokenizer_exports_as_itself(qwen3_folder: Path, tmp_path: Path) -> None:
    server = load_tokenizer(qwen3_folder)
    out = export_tokenizer(server, tmp_path / "export")
    client = AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        assert client.encode(text, add_special_tokens=False) == server.encode(text, add_special_tokens=False)
    assert client.chat_template == server.chat_template
    assert export_tokenizer(load_tokenizer(qwen3_folder), out) == out  # written once
