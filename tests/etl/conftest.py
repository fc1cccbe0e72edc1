from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.etl_runs import synth

from .fixtures import tiny_brats


@pytest.fixture
def make_brats(tmp_path):
    """`make_brats(layout, patients=2, shape=(32, 32, 16), **options)` -> dataset root under tmp_path."""

    def build(layout="brats2020", patients=2, shape=(32, 32, 16), **options):
        return tiny_brats(tmp_path, layout, patients, shape, **options)

    return build


_TEMPLATES: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def source_factory(tmp_path_factory):
    """`source_factory(layout="brats2020", patients=4)`: a copy of a synthetic source of
    `helpers.etl_runs.SHAPE` (made once per layout and size) that a test may damage."""

    def make(layout: str = "brats2020", patients: int = 4) -> Path:
        key = (layout, patients)
        if key not in _TEMPLATES:
            _TEMPLATES[key] = synth(tmp_path_factory.mktemp(f"tpl-{layout}-{patients}"), layout, patients)
        target = tmp_path_factory.mktemp(f"src-{layout}")
        shutil.copytree(_TEMPLATES[key], target, dirs_exist_ok=True)
        return target

    return make
