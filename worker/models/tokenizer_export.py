"""A client-loadable copy of each served model's tokenizer: what the API serves for `get_info`'s `tokenizer_id`.

The Tinker SDK's `get_tokenizer()` calls `AutoTokenizer.from_pretrained(tokenizer_id)` with no remote code. A
model folder often cannot be read that way: Kimi K2 ships `tiktoken.model` with `tokenization_kimi.py` and an
`auto_map` in its configs (a plain `AutoTokenizer` then demands `trust_remote_code`). `export_tokenizer` writes,
once per model cache, a folder holding only tokenizer files that a stock transformers install loads as a fast
tokenizer encoding exactly as the server does (Kimi's ranks, regex and special tokens converted to a
`tokenizer.json`), with the chat template the server renders with.

The worker publishes the folder to the checkpoint store (`contract/published_tokenizers.py`), from where the API
serves it over HTTP, Hugging Face Hub routes included, to clients anywhere.

Limits: written once per model cache and never refreshed (delete it after changing a model's tokenizer files).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from worker.models.bpe_ranks import read_ranks
from worker.models.folder_once import folder_once
from worker.models.kimi_tokenizer import KimiTokenizer
from worker.models.tokenizer_folders import write_kimi_tokenizer

PREPROCESSOR_CONFIG = "preprocessor_config.json"


def _write(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    if isinstance(tokenizer, KimiTokenizer):
        write_kimi_tokenizer(out, read_ranks(Path(tokenizer.vocab_file)))
        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = tokenizer.chat_template  # the served folder's own template, as the server uses it
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    else:
        tokenizer.save_pretrained(str(out))


def export_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path, image_processor: Path | None = None) -> Path:
    """`out`, holding `tokenizer` as a folder `AutoTokenizer` loads without remote code (written once, atomically),
    and a vision model's `preprocessor_config.json` (`image_processor`), so clients can size images as the server
    does (`AutoImageProcessor`)."""

    def write(staging: Path) -> None:
        _write(tokenizer, staging)
        if image_processor is not None:
            shutil.copyfile(image_processor, staging / PREPROCESSOR_CONFIG)

    return folder_once(out, "tokenizer_config.json", write)
