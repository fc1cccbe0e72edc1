"""Step 1 of the build: scan the source, and decide which patients go on.

Header-level problems (a missing modality, an unreadable header, a patient id that cannot be a
record key) are all collected first and stop the build before anything is written, unless
`--skip-bad`; then they are listed in the manifest's `skipped` with the file relative to the
source (the content holds no machine paths).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shards_spec.errors import SourceError

MAX_PROBLEM_LINES = 20


@dataclass
class SourcePatients:
    """What the scan found, reduced to what the build uses."""

    scan: object  # etl.sources.Scan
    refs: dict  # patient id -> PatientRef, the patients to build
    skipped: list[dict]  # scan problems left out with --skip-bad: {patient, file, problem}


def scan_patients(src: Path, layout: str | None, skip_bad: bool, log, max_patient_bytes: int) -> SourcePatients:
    """Scan `src`; raise one SourceError listing the problems unless `skip_bad`."""
    from shards_spec.codec import KEY_PATTERN

    from .sources import scan_source, source
    from .task import portable

    scan = scan_source(src, layout, require_labels=True, check_headers=True, max_patient_bytes=max_patient_bytes)
    for note in scan.notes:
        log(note)
    problems = list(scan.problems)
    for ref in scan.patients:
        if not KEY_PATTERN.match(ref.id):
            problems.append(SourceError(f"patient id {ref.id!r} is not usable as a record key ([A-Za-z0-9_-], no dot)",
                                        src / ref.id))
    owner = source(scan.layout)
    bad_ids = {problem_patient(p, owner) for p in problems}
    if problems and not skip_bad:
        raise SourceError(format_problems(problems, len(scan.patients) + len(bad_ids)))
    refs = {ref.id: ref for ref in scan.patients if ref.id not in bad_ids}
    if not refs:
        raise SourceError("holds no usable labelled patient" + (f" ({len(problems)} bad)" if problems else ""), src)
    skipped = sorted(
        ({"patient": problem_patient(p, owner), "file": relative(p.path, src), "problem": portable(p.problem, str(src))}
         for p in problems),
        key=lambda s: (s["patient"], s["file"] or ""),
    )
    return SourcePatients(scan, refs, skipped)


def problem_patient(exc: SourceError, layout) -> str:
    """The patient a scan problem belongs to, from the path it names (the nearest component the
    layout recognises as a patient, else the file's folder)."""
    from .sources.base import safe_id

    patient = getattr(exc, "patient", None)
    if patient:
        return str(patient)
    if not exc.path:
        return "?"
    path = Path(exc.path)
    for part in reversed(path.parts):
        found = layout.patient_of(part)
        if found is not None:
            return found
    return safe_id(path.parent.name if path.suffix else path.name)


def relative(path: str | None, src: Path) -> str | None:
    """A source file path relative to the source root (content must not hold machine paths); a
    link is named where it lies, not where it points (it may point nowhere, or at itself)."""
    if path is None:
        return None
    try:
        full = Path(path).parent.resolve() / Path(path).name
        return full.relative_to(src.resolve()).as_posix()
    except ValueError:
        return Path(path).name


def format_problems(problems: list[SourceError], total: int) -> str:
    """One line per bad patient (at most MAX_PROBLEM_LINES), then a summary line."""
    lines = [str(p) for p in problems[:MAX_PROBLEM_LINES]]
    if len(problems) > MAX_PROBLEM_LINES:
        lines.append(f"... and {len(problems) - MAX_PROBLEM_LINES} more")
    if len(problems) > 1:
        lines.append(f"{len(problems)} problem(s) in {total} patient folder(s); nothing was written "
                     "(--skip-bad builds the rest)")
    return "\n".join(lines)
