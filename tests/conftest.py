"""Settings for every test process and the subprocesses tests start."""

import os

# Tests run tools under RLIMIT_FSIZE (a full disk, as root cannot be refused a write otherwise);
# Python's own .pyc writer truncates its files under that limit, and a truncated .pyc of a module
# edited since the last run breaks every later import of it. Subprocesses read the .pyc files the
# test process wrote, and write none.
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
