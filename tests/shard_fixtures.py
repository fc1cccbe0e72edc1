"""Tiny shard folders with known values, written by the real writers, for reader tests.

Every image plane is constant and encodes where it came from, exactly representable in float16:
`image[s, c] == sample_code(patient_index, s) * 4 + c` with `sample_code = 64 * patient_index + s`
(patient index = position in `patients`, fewer than 8 patients and 64 slices). Slice `s` holds
tumour when `s % tumour_every == 0`: labels 1, 2, 3 at row 0, columns 0..2, everything else 0.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import numpy as np

from etl.writers import webdataset as wds_writer, zarr as zarr_writer
from shards_spec.labels import CHANNELS, LABEL_NAMES, class_voxels
from shards_spec.manifest import MANIFEST_NAME, SPEC_VERSION, to_bytes, validate_content
from shards_spec.preprocess import Slices

IDENTITY = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def sample_code(patient_index: int, s: int) -> int:
    return 64 * patient_index + s


def decode_code(image) -> int:
    """The sample code of an image (C, H, W) whose first channel is manifest channel `first`."""
    return int(round(float(image[0, 0, 0]))) // 4


def patient_slices(patient_index: int, n_slices: int, size: int, channels: int, tumour_every: int) -> Slices:
    if not (patient_index < 8 and n_slices <= 64):
        raise ValueError("the value code needs fewer than 8 patients and at most 64 slices each")
    image = np.zeros((n_slices, channels, size, size), dtype=np.float16)
    mask = np.zeros((n_slices, size, size), dtype=np.uint8)
    for s in range(n_slices):
        for c in range(channels):
            image[s, c] = sample_code(patient_index, s) * 4 + c
        if s % tumour_every == 0:
            mask[s, 0, :3] = [1, 2, 3]
    return Slices(
        image=image,
        mask=mask,
        slice_index=[10 + s for s in range(n_slices)],
        class_voxels=[class_voxels(m) for m in mask],
        brain_voxels=[size * size] * n_slices,
    )


def make_shards(
    tmp_path: Path,
    fmt: str = "webdataset",
    patients: dict[str, int] | None = None,
    splits: dict[str, list[str]] | None = None,
    size: int = 16,
    channels: int = 4,
    tumour_every: int = 2,
    patients_per_shard: int = 1,
    compression: str = "none",
) -> Path:
    """Write a shard folder under `tmp_path/shards-<fmt>` and return its path.

    `patients` maps patient id -> slice count (default three patients); `splits` maps split name
    -> patient ids (default: all in 'train'). The manifest follows the ETL's field names and is
    checked by `validate_content`.
    """
    patients = patients or {"p1": 3, "p2": 5, "p3": 4}
    splits = splits or {"train": list(patients)}
    names = list(CHANNELS[:channels])
    root = Path(tmp_path) / f"shards-{fmt}"
    root.mkdir(parents=True)
    index = {pid: i for i, pid in enumerate(patients)}
    data = {pid: patient_slices(index[pid], n, size, channels, tumour_every) for pid, n in patients.items()}
    shard_entries, patient_entries, split_entries = [], {}, {}
    if fmt == "zarr":
        zarr_writer.write_root(root, list(splits))
    for split, pids in splits.items():
        groups = [pids[i:i + patients_per_shard] for i in range(0, len(pids), patients_per_shard)]
        if fmt == "zarr" and patients_per_shard != 1:
            raise ValueError("zarr fixtures hold one patient per shard")
        for g, group in enumerate(groups):
            if fmt == "webdataset":
                path = wds_writer.shard_name(split, g, compression)
                files = wds_writer.write_shard(root, path, [(pid, pid, data[pid]) for pid in group], compression)
            else:
                path = f"{split}/{split}-{g:06d}"  # as etl.build names zarr shards
                files = zarr_writer.write_patient(root, split, group[0], data[group[0]])
            slices = sum(patients[pid] for pid in group)
            shard_entries.append({
                "path": path, "split": split, "patients": group, "records": len(group), "slices": slices,
                "bytes": sum(f["bytes"] for f in files), "files": files,
            })
            for pid in group:
                entry = {
                    "split": split, "shard": path, "key": pid, "slices": patients[pid],
                    "tumour_slices": sum(1 for s in range(patients[pid]) if s % tumour_every == 0),
                    "class_voxels": [sum(c[i] for c in data[pid].class_voxels) for i in range(4)],
                    "class_voxels": [int(v) for v in np.sum(data[pid].class_voxels, axis=0)],
                    "brain_voxels": int(sum(data[pid].brain_voxels)),
                    "source_shape": [size, size, 64], "spacing": [1.0, 1.0, 1.0], "affine": IDENTITY,
                }
                if fmt == "zarr":
                    entry["arrays"] = zarr_writer.array_paths(split, pid)
                patient_entries[pid] = entry
        split_entries[split] = {"patients": list(pids), "records": len(pids), "slices": sum(patients[p] for p in pids)}
    content = {
        "spec_version": SPEC_VERSION,
        "format": fmt,
        "channels": names,
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "preprocessing": {"size": size, "norm": "slice", "keep_empty": False},
        "source": {"layout": "synthetic-test"},
        "split": {"method": "fixed"},
        "splits": split_entries,
        "shards": shard_entries,
        "patients": patient_entries,
        "skipped": [],
    }
    validate_content(content)
    (root / MANIFEST_NAME).write_bytes(to_bytes(content, {"command": "tests.shard_fixtures.make_shards"}))
    return root


class RangeHandler(SimpleHTTPRequestHandler):
    """http.server plus single-range `Range: bytes=a-b` requests (206), as object stores answer."""

    ranges: list = []

    def log_message(self, *args):
        pass

    def send_head(self):
        header = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", header or "")
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
        if start >= len(data):
            self.send_error(416)
            return None
        type(self).ranges.append(header)
        body = data[start:end + 1]
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


@contextlib.contextmanager
def serve_range_http(directory: Path) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1 (a free port) with Range support; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def learnable_slices(patient_index: int, n_slices: int, size: int, channels: int, tumour_every: int) -> Slices:
    """A square lesion per tumour slice whose labels are visible in the channels: ED bright in
    every channel, ET brighter still, NEC/NET dark (a model can learn this in a few steps)."""
    rng = np.random.default_rng(patient_index)
    image = (0.1 * rng.standard_normal((n_slices, channels, size, size)) + 0.5).astype(np.float16)
    mask = np.zeros((n_slices, size, size), dtype=np.uint8)
    for s in range(n_slices):
        if s % tumour_every == 0:
            r, c = rng.integers(1, size - 8, 2)
            mask[s, r:r + 7, c:c + 7] = 2
            mask[s, r + 1:r + 6, c + 1:c + 6] = 3
            mask[s, r + 2:r + 5, c + 2:c + 5] = 1
    level = np.array([0.5, 0.5, 2.0, 3.0, -1.0], dtype=np.float32)[mask]  # per label 0..3
    image = (image + level[:, None]).astype(np.float16)
    return Slices(image=image, mask=mask, slice_index=list(range(n_slices)),
                  class_voxels=[class_voxels(m) for m in mask], brain_voxels=[size * size] * n_slices)
