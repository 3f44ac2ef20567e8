"""The checkpoint tests of tests/unit/test_checkpoint_management.py that touch stored files, with the checkpoint
store on S3 (moto): copy_weights copies through the S3 store, and the sweep deletes expired checkpoints from it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.settings import Settings
from tests.unit.test_checkpoint_management import (  # noqa: F401 - collected here, on the `door` below
    BASE,
    Door,
    open_door,
    test_another_tenant_copies_only_a_published_checkpoint_and_owns_the_copy,
    test_copy_weights_copies_the_files_into_a_new_run_of_the_caller,
    test_copy_weights_into_a_run_slot_of_a_session,
    test_ttl_sets_and_clears_expiry_and_an_expired_checkpoint_is_gone_then_swept,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def door(bucket: str, tmp_path: Path) -> Iterator[Door]:
    settings = Settings(
        data_dir=tmp_path,
        checkpoint_url=f"s3://{bucket}/ckpt",
        checkpoint_cache_dir=tmp_path / "cache",
        base_models=[BASE],
        queue="external",
    )
    yield from open_door(settings)
