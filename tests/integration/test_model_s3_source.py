"""A catalogue entry whose model folder lives under an `s3://` prefix (a real S3 server: moto): the API reads its
config from S3, a worker downloads the folder once into its model cache and loads it; a prefix without a model is
refused naming the prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contract.catalogue import TINY_QWEN3_MOE
from contract.catalogue_file import CatalogueError, load_catalogue
from tests.unit.worker_fixtures import MODEL_CACHE
from worker.models.loader import load_base_model
from worker.models.model_folder import ModelFolderError, fetch_s3_folder
from worker.models.registry import model_dir

pytestmark = pytest.mark.integration


def _upload(s3, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(folder.iterdir()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def test_an_s3_model_is_read_downloaded_once_and_loaded(s3, bucket, tmp_path: Path) -> None:
    local = model_dir(TINY_QWEN3_MOE, MODEL_CACHE)
    _upload(s3, bucket, local, "models/qwen3-moe-mini")
    catalogue = tmp_path / "catalogue.yaml"
    catalogue.write_text(
        f"builtins: false\nmodels:\n  - id: acme/qwen3-moe-mini\n    source: s3://{bucket}/models/qwen3-moe-mini\n"
    )
    entry = load_catalogue(catalogue).entries["acme/qwen3-moe-mini"]
    assert entry.arch == "Qwen3MoeForCausalLM" and entry.total_params == TINY_QWEN3_MOE.total_params

    cache = tmp_path / "cache"
    lm = load_base_model(entry, cache)
    assert lm.path == cache / entry.cache_name
    assert sorted(p.name for p in lm.path.iterdir()) == sorted(p.name for p in local.iterdir())
    reference = load_base_model(TINY_QWEN3_MOE, MODEL_CACHE)
    ids = torch.tensor([[9707, 1879, 0]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, reference.model(ids).logits, rtol=0, atol=0)

    s3.delete_object(Bucket=bucket, Key="models/qwen3-moe-mini/config.json")
    assert fetch_s3_folder(entry.source, lm.path) == lm.path  # the cached copy is used, S3 not read again


def test_a_prefix_without_a_model_is_refused(s3, bucket, tmp_path: Path) -> None:
    catalogue = tmp_path / "catalogue.yaml"
    catalogue.write_text(f"models:\n  - id: m\n    source: s3://{bucket}/nothing-here\n")
    with pytest.raises(CatalogueError, match=f"s3://{bucket}/nothing-here/config.json: cannot read"):
        load_catalogue(catalogue)
    s3.put_object(Bucket=bucket, Key="half/model.safetensors", Body=b"x")
    with pytest.raises(ModelFolderError, match=f"s3://{bucket}/half: no config.json under this prefix"):
        fetch_s3_folder(f"s3://{bucket}/half", tmp_path / "cache" / "half")
