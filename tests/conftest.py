"""Settings for every test process and the subprocesses tests start."""

import os

import pytest

# Tests run tools under RLIMIT_FSIZE (a full disk, as root cannot be refused a write otherwise);
# Python's own .pyc writer truncates its files under that limit, and a truncated .pyc of a module
# edited since the last run breaks every later import of it. Subprocesses read the .pyc files the
# test process wrote, and write none.
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"


@pytest.fixture
def oracle_registered(monkeypatch):
    """The test-only Oracle model (tests/helpers/predict.py) registered as "oracle" for one test."""
    from tests.helpers.predict import Oracle
    from train import models

    monkeypatch.setitem(models.MODELS, "oracle", Oracle)
    return Oracle
