"""The saga engine's and disk_create's tests again, on PostgreSQL instead of SQLite.

The test bodies are the unit tests' own, imported; only the ``database`` fixture
changes, so both databases are held to exactly the same behaviour.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.saga_support import Database, add_sleds
from tests.unit.test_disk_create_saga import (
    test_a_failing_undo_leaves_the_saga_stuck_and_the_disk_faulted,
    test_a_failure_at_every_node_unwinds_to_a_clean_slate,
    test_a_region_that_fails_at_its_agent_unwinds,
    test_disk_create_succeeds,
    test_every_node_run_twice_still_succeeds,
    test_regions_are_placed_on_distinct_sleds,
)
from tests.unit.test_instance_sagas import (
    test_a_sled_that_refuses_fails_the_create_at_once,
    test_disk_delete_deletes_its_regions_and_frees_the_space,
    test_disk_delete_every_node_twice,
    test_disk_delete_failure_at_every_node_leaves_the_disk_visible,
    test_disk_delete_refuses_an_attached_disk,
    test_instance_create_attaches_its_disk_and_runs,
    test_instance_create_every_node_twice,
    test_instance_create_failure_at_every_node_unwinds_to_a_clean_slate,
    test_power_sagas_fail_at_every_node_and_run_twice,
    test_stop_start_reboot_and_delete,
)
from tests.unit.test_saga_engine import (
    test_a_deadline_rearms_then_fails,
    test_a_duplicate_or_stale_event_changes_nothing,
    test_a_lost_notification_is_recovered_at_the_deadline_by_one_query,
    test_a_replica_that_lost_its_lease_cannot_write,
    test_a_reused_key_is_not_satisfied_by_an_old_event,
    test_a_saga_of_an_unknown_version_is_left_alone_and_reported,
    test_an_event_no_saga_claims_is_moved_where_an_operator_sees_it,
    test_an_event_resumes_a_parked_saga,
    test_an_event_that_arrives_before_the_saga_parks_is_not_lost,
    test_an_unrecoverable_saga_is_marked_and_does_not_block_others,
    test_parked_waits_hold_no_lease_and_show_their_deadline,
)

pytestmark = pytest.mark.integration

__all__ = [
    "test_a_deadline_rearms_then_fails",
    "test_a_duplicate_or_stale_event_changes_nothing",
    "test_a_failing_undo_leaves_the_saga_stuck_and_the_disk_faulted",
    "test_a_failure_at_every_node_unwinds_to_a_clean_slate",
    "test_a_lost_notification_is_recovered_at_the_deadline_by_one_query",
    "test_a_region_that_fails_at_its_agent_unwinds",
    "test_a_replica_that_lost_its_lease_cannot_write",
    "test_a_reused_key_is_not_satisfied_by_an_old_event",
    "test_a_saga_of_an_unknown_version_is_left_alone_and_reported",
    "test_a_sled_that_refuses_fails_the_create_at_once",
    "test_an_event_no_saga_claims_is_moved_where_an_operator_sees_it",
    "test_an_event_resumes_a_parked_saga",
    "test_an_event_that_arrives_before_the_saga_parks_is_not_lost",
    "test_an_unrecoverable_saga_is_marked_and_does_not_block_others",
    "test_disk_create_succeeds",
    "test_disk_delete_deletes_its_regions_and_frees_the_space",
    "test_disk_delete_every_node_twice",
    "test_disk_delete_failure_at_every_node_leaves_the_disk_visible",
    "test_disk_delete_refuses_an_attached_disk",
    "test_every_node_run_twice_still_succeeds",
    "test_instance_create_attaches_its_disk_and_runs",
    "test_instance_create_every_node_twice",
    "test_instance_create_failure_at_every_node_unwinds_to_a_clean_slate",
    "test_parked_waits_hold_no_lease_and_show_their_deadline",
    "test_power_sagas_fail_at_every_node_and_run_twice",
    "test_regions_are_placed_on_distinct_sleds",
    "test_stop_start_reboot_and_delete",
]


@pytest.fixture
async def database(fresh_postgres_url: str) -> AsyncIterator[Database]:
    db = await Database.migrated(fresh_postgres_url)
    # As the SQLite fixtures of the saga tests; the engine's tests ignore them.
    await db.add_datasets(4)
    await add_sleds(db, 2)
    yield db
    await db.close()
