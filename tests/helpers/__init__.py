"""Helpers shared by several test modules (plain functions and constants, no tests).

Test modules import from here, from `tests.shard_fixtures` or from conftest fixtures, never from
another `test_*.py`, so any test file can be moved or deleted without breaking the others.
"""
