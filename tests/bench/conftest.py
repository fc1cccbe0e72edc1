"""The bench harness's end-to-end test trains models (a minute on two cores): `slow`, marked here
because tests/bench/test_quality.py was being edited when the marks were added (issue 21); the
mark may move onto the test itself."""

from __future__ import annotations

import pytest

SLOW = ("tests/bench/test_quality.py::test_the_harness_trains_ours_and_the_peer_scores_both_and_writes_its_section",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.split("[")[0] in SLOW:
            item.add_marker(pytest.mark.slow)
