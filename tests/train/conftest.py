"""Fixtures shared by the `train` tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.train_runs import build


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Tiny learnable shards (16x16): p1-p3 train (6 slices each), p4 val (4 slices), made once per
    module. A module that needs other shards defines its own `shards` fixture, which takes precedence."""
    root = tmp_path_factory.mktemp("shards")
    return build(root, "a", {"p1": 6, "p2": 6, "p3": 6, "p4": 4}, {"train": ["p1", "p2", "p3"], "val": ["p4"]})
