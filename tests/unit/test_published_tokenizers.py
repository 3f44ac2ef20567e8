"""A base model's tokenizer published by its workers in the checkpoint store (`contract/published_tokenizers.py`):
it comes back verified with each file's size and SHA-256 and a revision over them; an unchanged tokenizer is not
rewritten, a changed one replaces it under a new revision; a damaged or absent one is `TokenizerNotPublished`; a
folder with sub-folders is refused; and `loom gc` leaves a published tokenizer in place however old it is."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.catalogue import SMOLLM2, TINY_KIMI_K2
from contract.checkpoint_store import LocalCheckpointStore
from contract.published_tokenizers import (
    TokenizerNotPublished,
    open_published_tokenizer,
    publish_tokenizer,
    tokenizer_uri,
)


class CountingStore(LocalCheckpointStore):
    """A local store that counts its writes."""

    writes = 0

    def write(self, *args, **kwargs):
        self.writes += 1
        return super().write(*args, **kwargs)


def exported(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


FILES = {"tokenizer.json": b'{"model": {}}', "tokenizer_config.json": b'{"tokenizer_class": "X"}'}


def test_publish_then_open_gives_the_files_their_digests_and_a_revision(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "store")
    revision = publish_tokenizer(store, SMOLLM2, exported(tmp_path / "export", FILES))
    published = open_published_tokenizer(store, SMOLLM2)
    assert published.revision == revision and len(revision) == 40
    assert [(f.name, f.size, f.sha256) for f in published.files] == [
        (name, len(data), hashlib.sha256(data).hexdigest()) for name, data in sorted(FILES.items())
    ]
    assert all((published.folder / name).read_bytes() == data for name, data in FILES.items())
    assert published.file("tokenizer.json") is not None and published.file("config.json") is None
    assert tokenizer_uri(store, SMOLLM2) == (store.root / ".tokenizers" / SMOLLM2.cache_name / "files").as_uri()
    with pytest.raises(TokenizerNotPublished):
        open_published_tokenizer(store, TINY_KIMI_K2)  # another model: nothing published


def test_an_unchanged_tokenizer_is_not_rewritten_and_a_changed_one_replaces_it(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "store")
    first = publish_tokenizer(store, SMOLLM2, exported(tmp_path / "a", FILES))
    assert publish_tokenizer(store, SMOLLM2, exported(tmp_path / "b", FILES)) == first
    assert store.writes == 1
    changed = {**FILES, "tokenizer.json": b'{"model": {"vocab": {}}}'}
    second = publish_tokenizer(store, SMOLLM2, exported(tmp_path / "c", changed))
    assert second != first and store.writes == 2
    published = open_published_tokenizer(store, SMOLLM2)
    assert published.revision == second
    assert (published.folder / "tokenizer.json").read_bytes() == changed["tokenizer.json"]


def test_a_damaged_copy_is_not_served_and_the_next_publication_repairs_it(tmp_path: Path) -> None:
    store = LocalCheckpointStore(tmp_path / "store")
    revision = publish_tokenizer(store, SMOLLM2, exported(tmp_path / "export", FILES))
    published = open_published_tokenizer(store, SMOLLM2)
    (published.folder / "tokenizer.json").write_bytes(b"tampered")
    with pytest.raises(TokenizerNotPublished, match="does not match its manifest"):
        open_published_tokenizer(store, SMOLLM2)
    assert publish_tokenizer(store, SMOLLM2, tmp_path / "export") == revision
    assert open_published_tokenizer(store, SMOLLM2).revision == revision


def test_a_folder_with_sub_folders_is_refused(tmp_path: Path) -> None:
    folder = exported(tmp_path / "export", FILES)
    (folder / "additional_chat_templates").mkdir()
    with pytest.raises(ValueError, match="must be flat"):
        publish_tokenizer(LocalCheckpointStore(tmp_path / "store"), SMOLLM2, folder)


def test_gc_keeps_published_tokenizers_however_old(tmp_path: Path, sqlite_url: str) -> None:
    store = LocalCheckpointStore(tmp_path / "ckpt")
    publish_tokenizer(store, TINY_KIMI_K2, exported(tmp_path / "export", FILES))
    folder = Path(tokenizer_uri(store, TINY_KIMI_K2).removeprefix("file://"))
    orphan = Path(store.write("alice", "run", "weights/orphan", lambda f: (f / "x").write_bytes(b"x"))[0][7:])
    then = time.time() - 48 * 3600
    for path in [folder, *folder.rglob("*"), orphan, *orphan.rglob("*")]:
        os.utime(path, (then, then))
    env = os.environ | {
        "LOOM_DATABASE_URL": sqlite_url,
        "LOOM_DATA_DIR": str(tmp_path / "data"),
        "LOOM_CHECKPOINT_DIR": str(store.root),
        "LOOM_BASE_MODELS": "smollm2-135m-instruct",  # gc keeps every catalogue model's, not just the served ones
    }
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "gc", "--grace-hours", "24"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert not orphan.exists()
    assert open_published_tokenizer(store, TINY_KIMI_K2).files
