"""The checkpoint management and usage tests of tests/unit/test_checkpoint_management.py, on PostgreSQL: the same
routes and queries (expiry comparisons, outer joins, grouping, a copy's unique-key race) on the production database."""

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
    test_publishing_lets_every_tenant_read_and_only_the_owner_change_it,
    test_ttl_sets_and_clears_expiry_and_an_expired_checkpoint_is_gone_then_swept,
    test_usage_counts_finished_tokens_saves_and_stored_bytes,
    test_user_checkpoints_are_listed_across_runs_newest_first_with_a_cursor,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def door(postgres_url: str, tmp_path: Path) -> Iterator[Door]:
    yield from open_door(Settings(data_dir=tmp_path, database_url=postgres_url, base_models=[BASE], queue="external"))
