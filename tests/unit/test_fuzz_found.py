"""What the fuzz run (tests/unit/test_fuzz.py) found, each kept as a plain test of its fix."""

from __future__ import annotations

import pytest

from rollout.api import rollout_router
from tests.unit.test_gateway import assert_openai_error

BEYOND_ANY_ROW = 2**63  # SQLite refuses it as a parameter (OverflowError), PostgreSQL past 2**31


@pytest.mark.parametrize("path", ["/admin/rollouts/{}", "/admin/rollouts/commands/{}"])
def test_a_row_id_beyond_the_database_s_integers_is_a_400_not_a_500(make_harness, path) -> None:
    gw = make_harness(routers=lambda store: [rollout_router(store)])
    response = gw.admin("GET", path.format(BEYOND_ANY_ROW))
    assert_openai_error(response, 400)
