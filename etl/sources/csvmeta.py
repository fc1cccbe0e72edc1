"""The per-patient CSVs released beside the BraTS 2020 patient folders.

`name_mapping.csv` gives the grade (HGG/LGG) and the patient's ids in earlier releases and TCIA;
`survival_info.csv` gives age, overall survival and extent of resection for the HGG patients.
The validation set has `name_mapping_validation_data.csv` (no grade) and `survival_evaluation.csv`
(age, resection). All are optional; a CSV that is present but cannot be parsed is a SourceError
naming it, because silently dropping grades would change the stratified splits.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from shards_spec.errors import SourceError

NAME_MAPPING_FILES = ("name_mapping.csv", "name_mapping_validation_data.csv")
SURVIVAL_FILES = ("survival_info.csv", "survival_evaluation.csv")
GRADES = ("HGG", "LGG")
_MISSING = {"", "na", "n/a", "nan", "none", "unknown"}
_ALIVE = re.compile(r"^\s*alive\s*\(\s*(\d+)\s*days?\s+later\s*\)\s*$", re.IGNORECASE)


def read_csv_metadata(folder: Path) -> tuple[dict[str, dict], list[Path]]:
    """Metadata of every patient named in the known CSVs of `folder`.

    Returns ({patient id: {"grade": str | None, "meta": dict}}, the CSV files read).
    """
    by_id: dict[str, dict] = {}
    read: list[Path] = []
    for name in NAME_MAPPING_FILES:
        path = folder / name
        if path.is_file():
            for pid, grade, meta in _name_mapping(path):
                entry = by_id.setdefault(pid, {"grade": None, "meta": {}})
                entry["grade"] = grade or entry["grade"]
                entry["meta"].update(meta)
            read.append(path)
    for name in SURVIVAL_FILES:
        path = folder / name
        if path.is_file():
            for pid, meta in _survival(path):
                by_id.setdefault(pid, {"grade": None, "meta": {}})["meta"].update(meta)
            read.append(path)
    return by_id, read


def _rows(path: Path, required_any: dict[str, tuple[str, ...]]):
    """Yield (line number, row dict keyed by canonical names) after checking the header."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise SourceError("CSV file is empty (no header line)", path)
            lowered = [h.strip().lower() for h in header]
            columns: dict[str, int] = {}
            for canonical, aliases in required_any.items():
                for alias in aliases:
                    if alias.lower() in lowered:
                        columns[canonical] = lowered.index(alias.lower())
                        break
            yield header, columns
            for number, row in enumerate(reader, start=2):
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise SourceError(
                        f"malformed CSV: line {number} has {len(row)} fields, the header has {len(header)}",
                        path,
                    )
                yield number, {h: row[i].strip() for h, i in columns.items()}, row
    except UnicodeDecodeError:
        raise SourceError("is not a text CSV file (cannot be decoded as UTF-8)", path) from None
    except csv.Error as exc:
        raise SourceError(f"malformed CSV ({exc})", path) from None
    except OSError as exc:
        raise SourceError(f"cannot be read ({exc.strerror or exc})", path) from None


def _name_mapping(path: Path):
    rows = _rows(path, {"id": ("BraTS_2020_subject_ID",), "grade": ("Grade",)})
    header, columns = next(rows)
    if "id" not in columns:
        raise SourceError("malformed name mapping CSV: no BraTS_2020_subject_ID column", path)
    for number, row, raw in rows:
        pid = row["id"]
        if not pid:
            raise SourceError(f"malformed name mapping CSV: line {number} has no BraTS_2020_subject_ID", path)
        grade = None
        if "grade" in columns and row["grade"].lower() not in _MISSING:
            grade = row["grade"].upper()
            if grade not in GRADES:
                raise SourceError(
                    f"malformed name mapping CSV: line {number} has grade {row['grade']!r}, expected HGG or LGG",
                    path,
                )
        source_ids = {
            name.strip(): value.strip()
            for name, value in zip(header, raw)
            if name.strip().lower().endswith("subject_id")
            and name.strip() != "BraTS_2020_subject_ID"
            and value.strip().lower() not in _MISSING
        }
        yield pid, grade, ({"source_ids": source_ids} if source_ids else {})


def _survival(path: Path):
    rows = _rows(
        path,
        {
            "id": ("Brats20ID", "BraTS20ID", "BraTS_2020_subject_ID"),
            "age": ("Age",),
            "survival": ("Survival_days", "Survival"),
            "resection": ("Extent_of_Resection", "ResectionStatus"),
        },
    )
    _, columns = next(rows)
    if "id" not in columns:
        raise SourceError("malformed survival CSV: no Brats20ID column", path)
    for number, row, _raw in rows:
        meta: dict = {}
        if "age" in columns and row["age"].lower() not in _MISSING:
            try:
                meta["age"] = float(row["age"])
            except ValueError:
                raise SourceError(
                    f"malformed survival CSV: line {number} has age {row['age']!r}, not a number", path
                ) from None
        if "survival" in columns and row["survival"].lower() not in _MISSING:
            meta.update(_survival_days(row["survival"], number, path))
        if "resection" in columns and row["resection"].lower() not in _MISSING:
            meta["extent_of_resection"] = row["resection"].upper()
        yield row["id"], meta


def _survival_days(text: str, number: int, path: Path) -> dict:
    """'289' (days until death) or 'ALIVE (361 days later)' (alive at last follow-up: censored)."""
    alive = _ALIVE.match(text)
    if alive:
        return {"survival_days": int(alive.group(1)), "survival_censored": True}
    try:
        days = float(text)
    except ValueError:
        raise SourceError(
            f"malformed survival CSV: line {number} has Survival_days {text!r}, "
            "expected a number of days or 'ALIVE (N days later)'",
            path,
        ) from None
    if days != int(days) or days < 0:
        raise SourceError(f"malformed survival CSV: line {number} has Survival_days {text!r}", path)
    return {"survival_days": int(days), "survival_censored": False}
