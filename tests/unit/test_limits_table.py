"""README.md's "Limits" table is exactly what `scripts/limits_table.py` generates from the enforced constants."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_documents_the_limits_the_checks_enforce() -> None:
    spec = importlib.util.spec_from_file_location("limits_table", ROOT / "scripts" / "limits_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "README.md").read_text()
    assert module.with_table(readme) == readme, "README.md is stale: run scripts/limits_table.py --write"
