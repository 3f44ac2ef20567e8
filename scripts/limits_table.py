"""Print (or, with --write, put into README.md) the "Limits" table, generated from the constants the checks use.

Sources: `loom.types.limits` (bounds every request must keep), `api/admission.py` (cost limits per base model,
from the default `Settings`), and the settings that bound requests and retries. A unit test fails when README.md
holds a table other than this script's output, so the documented limits cannot drift from the enforced ones.

Usage: `.venv/bin/python scripts/limits_table.py [--write]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api.admission import GIB, WorkerBudget  # noqa: E402
from contract.catalogue import BUILTIN_MODELS  # noqa: E402
from contract.settings import TRAIN_PASSES_PER_TICK, Settings  # noqa: E402
from loom.types import limits  # noqa: E402
from scripts.readme_region import print_or_write  # noqa: E402

REGION = "limits"


def default(setting: str) -> int:
    """A setting's default (never the environment's value: the README documents the defaults)."""
    return Settings.model_fields[setting].default


def table() -> str:
    rows = [
        ("ids, `seq_id`, `model_seq_id`, offsets", f"0 … 2^63 − 1 ({limits.INT64_MAX})"),
        ("seeds (LoRA, sampling)", f"0 … {limits.MAX_SEED}"),
        ("`seq_id` ahead of the run's newest op", f"at most {limits.SEQ_ID_WINDOW}"),
        ("checkpoint `ttl_seconds`", f"{limits.MIN_TTL_SECONDS} … {limits.MAX_TTL_SECONDS} (omit: kept forever)"),
        ("checkpoint names", f"`{limits.CHECKPOINT_NAME_PATTERN}`"),
        ("age recipients of one `save_weights_external`", str(limits.MAX_AGE_RECIPIENTS)),
        ("Adam `learning_rate`", f"0 … {limits.MAX_LEARNING_RATE:g}"),
        ("datums per forward_backward", str(limits.MAX_DATUMS)),
        ("2-D `target_tokens` K (cross_entropy)", str(limits.MAX_TARGET_K)),
        ("elements one tensor describes (dense shape)", str(limits.MAX_TENSOR_ELEMENTS)),
        ("nesting of free-form JSON (`user_metadata`, tools)", str(limits.MAX_JSON_DEPTH)),
        ("samples per request (`num_samples`, `n`)", str(limits.MAX_SAMPLES)),
        ("items per list page (`limit`)", str(limits.MAX_PAGE_SIZE)),
        ("request body", f"{default('max_body_bytes') >> 20} MiB (`LOOM_MAX_BODY_BYTES`); no `Content-Encoding`"),
        (
            "training pass (packed tokens; padded vision rows: rows × longest row)",
            f"{default('train_token_budget')} tokens (`LOOM_TRAIN_TOKEN_BUDGET`); "
            f"a worker tick packs, and a request may carry, {TRAIN_PASSES_PER_TICK} passes' worth",
        ),
        ("decode batch (samples × (prompt + max_tokens))", f"{default('token_budget')} tokens (`LOOM_TOKEN_BUDGET`)"),
        ("retries of a request whose worker died", f"{default('max_attempts')} attempts (`LOOM_MAX_ATTEMPTS`)"),
    ]
    lines = ["| limit | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows), ""]
    lines += [
        "| base model | context | longest training sequence | tokens per forward_backward | est. pass memory |",
        "|---|---|---|---|---|",
    ]
    for model in BUILTIN_MODELS.values():
        budget = WorkerBudget(model, default("train_token_budget"), default("token_budget"))
        lines.append(
            f"| `{model.name}` | {model.max_context_length} | {budget.max_train_sequence} | "
            f"{budget.max_train_request_tokens} | {budget.train_pass_bytes / GIB:.1f} GiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print_or_write(sys.argv[1:], REGION, table())
