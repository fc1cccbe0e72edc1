"""Summary lines stay whole when the output is piped (issue 22): rich wrapped the build summary at
its 80-column default for a pipe, as `144.1 \\nKiB/slice`, which a log or a grep splits mid-figure."""

from __future__ import annotations

import re

from tests.helpers.etl_runs import run_etl


def test_build_and_inspect_summaries_are_one_line_each_in_a_narrow_pipe(make_brats, tmp_path, capsys, monkeypatch):
    src = make_brats(patients=4)
    out = tmp_path / "shards"
    monkeypatch.setenv("COLUMNS", "40")  # narrower than every summary line below
    code, stdout, err = run_etl(["build-shards", "--src", src, "--out", out, "--workers", "0", "--size", "16",
                                 "--split", "train=0.5,val=0.5"], capsys)
    assert code == 0, err
    (line,) = [line for line in stdout.splitlines() if "KiB/slice" in line]
    assert re.fullmatch(r"4 patients, \d+ slices, \d+ shards \(\d+ built, 0 kept\), [\d.]+ KiB, [\d.]+ KiB/slice, "
                        r"[\d.]+ s", line), stdout
    assert re.search(r"^content digest [0-9a-f]{64}$", stdout, re.MULTILINE), stdout
    assert re.search(r"^shards: \d+/\d+ \(.*elapsed\)$", err, re.MULTILINE), err  # the progress line of a log

    code, stdout, err = run_etl(["inspect", out], capsys)
    assert code == 0, err
    (line,) = [line for line in stdout.splitlines() if line.startswith("provenance:")]
    assert "command 'etl build-shards" in line and "zarr " in line, stdout  # first and last of the line
