"""contract/settings.py: one settings object read from LOOM_* variables, each field documented once."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.settings import Settings, load_settings


def test_every_setting_is_documented() -> None:
    undocumented = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert undocumented == []


def test_values_come_from_loom_variables_with_derived_defaults(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOOM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOOM_BASE_MODELS", " tiny-kimi-k2 , smollm2-135m-instruct,")
    monkeypatch.setenv("LOOM_SAMPLER_BACKEND", "VLLM")
    monkeypatch.setenv("LOOM_LEASE_SECONDS", "60")
    monkeypatch.setenv("LOOM_HOME", str(tmp_path / "home"))
    settings = Settings()
    assert settings.base_models == ["tiny-kimi-k2", "smollm2-135m-instruct"]
    assert (settings.sampler_backend, settings.lease_seconds) == ("vllm", 60.0)
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'loom.db'}"
    assert settings.checkpoint_url == str(tmp_path / "data" / "checkpoints")
    assert settings.model_cache_dir == tmp_path / "home" / "models"
    assert not (tmp_path / "data").exists()  # reading settings creates nothing
    described = {variable: value for variable, value, _ in settings.describe()}
    assert described["LOOM_QUEUE"] == "embedded" and described["LOOM_RECOVERY_EVERY"] == "50"


def test_bad_values_end_the_process_naming_each_variable(monkeypatch) -> None:
    monkeypatch.setenv("LOOM_QUEUE", "carrier-pigeon")
    monkeypatch.setenv("LOOM_RECOVERY_EVERY", "-3")
    with pytest.raises(SystemExit) as stopped:
        load_settings()
    message = str(stopped.value)
    assert "LOOM_QUEUE: Input should be 'embedded', 'external' or 'celery'" in message
    assert "LOOM_RECOVERY_EVERY: Input should be greater than or equal to 0" in message
