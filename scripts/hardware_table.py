"""Print (or, with --write, put into README.md) the "Base model sizes" tables, computed from published configs.

For each model of `contract/published_models.py`: its total and activated parameters and the bytes its weights
take in bfloat16, float8 and int4 checkpoints (`contract/model_size.py`, from the published `config.json`), and
each GPU's share of the bfloat16 weights when ZeRO-3 partitions them over 1, 8, 16, 32 or 64 GPUs: the bfloat16
bytes over N, since ZeRO-3 keeps a 1/N slice of every parameter on each rank (its partition padding, under N
elements per tensor, left out). Computed, not measured. A unit test fails when README.md holds tables other than
this script's output.

Usage: `.venv/bin/python scripts/hardware_table.py [--write]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contract.model_size import model_size  # noqa: E402
from contract.published_models import PUBLISHED_MODELS, published_config  # noqa: E402
from scripts.readme_region import print_or_write  # noqa: E402

REGION = "hardware-table"
ZERO3_GPUS = (1, 8, 16, 32, 64)


def count(n: int) -> str:
    """A parameter count to three significant digits: 1.03T, 32.9B, 596M."""
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def size(nbytes: float) -> str:
    """Bytes in GiB from 1 GiB up, else in MiB."""
    return f"{nbytes / 2**30:,.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:,.0f} MiB"


def table() -> str:
    sizes = {m.name: model_size(published_config(m.slug)) for m in PUBLISHED_MODELS.values()}
    lines = [
        "| model | total params | active params | bf16 weights | fp8 weights | int4 weights |",
        "|---|---|---|---|---|---|",
        *(
            f"| `{name}` | {count(s.total_params)} | {count(s.active_params)} | {size(s.weight_bytes['bfloat16'])} "
            f"| {size(s.weight_bytes['float8'])} | {size(s.weight_bytes['int4'])} |"
            for name, s in sizes.items()
        ),
        "",
        "| bf16 weights per GPU, ZeRO-3 over | " + " | ".join(f"{n} GPU{'s' * (n > 1)}" for n in ZERO3_GPUS) + " |",
        "|---|" + "---|" * len(ZERO3_GPUS),
        *(
            f"| `{name}` | " + " | ".join(size(s.weight_bytes["bfloat16"] / n) for n in ZERO3_GPUS) + " |"
            for name, s in sizes.items()
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print_or_write(sys.argv[1:], REGION, table())
