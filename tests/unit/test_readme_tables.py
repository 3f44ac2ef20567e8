"""README.md's generated tables are exactly what their scripts generate: "Limits" from the enforced constants
(`scripts/limits_table.py`), "Base model sizes" from the published configs (`scripts/hardware_table.py`)."""

from __future__ import annotations

import importlib

import pytest

from scripts.readme_region import README, with_region


@pytest.mark.parametrize("script", ["limits_table", "hardware_table"])
def test_the_readme_holds_what_the_script_generates(script: str) -> None:
    module = importlib.import_module(f"scripts.{script}")
    readme = README.read_text()
    assert with_region(readme, module.REGION, module.table()) == readme, (
        f"README.md is stale: run scripts/{script}.py --write"
    )
