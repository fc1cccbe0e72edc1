from __future__ import annotations

import pytest

from .fixtures import tiny_brats


@pytest.fixture
def make_brats(tmp_path):
    """`make_brats(layout, patients=2, shape=(32, 32, 16), **options)` -> dataset root under tmp_path."""

    def build(layout="brats2020", patients=2, shape=(32, 32, 16), **options):
        return tiny_brats(tmp_path, layout, patients, shape, **options)

    return build
