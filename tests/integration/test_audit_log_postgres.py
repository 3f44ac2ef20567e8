"""The audit log tests of tests/unit/test_audit_log.py on PostgreSQL: the same recording (the expiry sweep's
DELETE ... RETURNING, events in the transactions of the changes) and queries (UTC day bounds on `timestamptz`, the
event-type prefixes, paging) on the production database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.settings import Settings
from tests.unit.test_audit_log import (  # noqa: F401 - collected here, on the `door` below
    test_a_checkpoints_life_is_recorded_in_order_with_its_facts,
    test_a_day_is_one_utc_day_and_entries_come_sorted_by_time,
    test_a_page_is_bounded_and_its_cursor_counts_the_day,
    test_an_overwrite_is_a_create_that_replaced_and_expiry_is_the_servers,
    test_event_type_keeps_one_resources_events,
    test_every_read_of_a_published_checkpoint_goes_to_the_owners_log_under_the_readers_name,
    test_project_moves_and_key_revocations_are_recorded,
)
from tests.unit.test_checkpoint_management import BASE, Door, open_door

pytestmark = pytest.mark.integration


@pytest.fixture
def door(postgres_url: str, tmp_path: Path) -> Iterator[Door]:
    yield from open_door(Settings(data_dir=tmp_path, database_url=postgres_url, base_models=[BASE], queue="external"))
