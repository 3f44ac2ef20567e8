"""Materialise a folder once, atomically: fill a staging folder beside it, then rename it into place.

Used for everything a worker writes into its model cache (built-in model folders, `s3://` downloads, exported
tokenizers), so a crash midway never leaves a half-written folder that later looks complete, and two processes
materialising the same folder at once both end with one whole copy (the rename loser's copy is discarded).

Limits: the folder counts as present once `marker` (a file the fill always writes) exists in it; it is never
refreshed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def folder_once(target: Path, marker: str, fill: Callable[[Path], None]) -> Path:
    """`target`, filled by `fill(staging)` and renamed into place unless `target / marker` already exists."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fill(staging)
        staging.rename(target)
    except OSError:
        if not (target / marker).exists():  # lost the rename to a concurrent fill: theirs is whole
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
