"""Our safe decoding inside your own `webdataset` pipeline.

`webdataset` is the format's home library, and people build their own pipelines with it. Its
defaults are unsafe for shards that come from others: `.decode()` unpickles `.pyd`/`.pickle`
members and `torch.load`s `.pth` ones through its fallback handlers, un-gzips `.gz` members
without a bound, and its tar reader reads each member (and each PAX header) whole before anything
can look at its size. Two ways to stay safe, both checked against the dataset's manifest:

1. `record_samples(store)`: a pipeline stage that turns shard URLs into decoded, verified
   samples by our own reader (`ShardStore.records`: sizes bounded before reading, sha256 and
   counts checked, a shard's samples released only once it has checked out). Use it in place of
   webdataset's opener, tar expander and decoder::

       import webdataset as wds
       from shards_spec.read import ShardStore
       from shards_spec.webdataset_pipeline import record_samples, shard_urls

       store = ShardStore("https://lab.example.org/brats-shards")
       pipeline = wds.DataPipeline(
           wds.SimpleShardList(shard_urls(store, "train")),
           wds.split_by_worker,
           record_samples(store, handler=wds.warn_and_continue),  # a bad shard: warn, skip it
           wds.shuffle(500),
           wds.map(lambda s: (s["image.npy"], s["mask.npy"])),
       )

2. `SafeDecoder(manifest)` after webdataset's own reading (`wds.WebDataset(urls, ...)`, e.g. for
   its cache): `select_files=decoder.select` so other members are never read, then
   `.map(decoder)` (or `.decode(decoder.handler, pre=[], post=[])`). It decodes only
   `image.npy`, `mask.npy` and `json`, never with pickle, with sizes and shapes bounded by the
   manifest, and refuses anything else with a `SpecError`. Member sizes are checked only once
   webdataset has read them, and nothing checks sha256: prefer 1 for shards from others.

A sample is `{"__key__", "__url__", "image.npy": float16 (S, C, H, W), "mask.npy": uint8
(S, H, W), "json": {"patient", "slice_index", "class_voxels", "brain_voxels"}}`: one patient.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from .codec import (IMAGE_DTYPE, MASK_DTYPE, MEMBER_SUFFIXES, Record, decode_json, decode_npy, decode_record,
                    member_limits, split_member_name)
from .errors import SpecError
from .manifest import Manifest


def shard_urls(store, split: str) -> list[str]:
    """The full path or URL of each shard of `split`, in manifest order."""
    return [store.location(shard["path"]) for shard in store.manifest.shards_of(split)]


def _reraise(exc: Exception) -> bool:
    raise exc


def record_samples(store, handler: Callable[[Exception], bool] = _reraise) -> Callable[[Iterable], Iterator[dict]]:
    """A pipeline stage: `{"url": ...}` dicts (or plain URLs) of `store`'s shards -> samples.

    `handler` is webdataset's error policy: called with the `SpecError` of a bad shard, it
    returns True to skip the shard (`wds.warn_and_continue`), False to stop, or raises
    (`wds.reraise_exception`, the default).
    """
    shards = {store.location(shard["path"]): shard for shard in store.manifest.content["shards"]}

    def stage(src: Iterable) -> Iterator[dict]:
        for item in src:
            url = item["url"] if isinstance(item, dict) else str(item)
            try:
                shard = shards.get(url)
                if shard is None:
                    raise SpecError("is not a shard of this dataset's manifest", url)
                records = list(store.records(shard))  # all or nothing: its sha256 is known at its end
            except SpecError as exc:
                if handler(exc):
                    continue
                break
            for record in records:
                yield _sample(record, url)

    return stage


def _sample(record: Record, url: str) -> dict:
    return {
        "__key__": record.key,
        "__url__": url,
        "image.npy": record.image,
        "mask.npy": record.mask,
        "json": {"patient": record.patient, "slice_index": record.slice_index,
                 "class_voxels": record.class_voxels, "brain_voxels": record.brain_voxels},
    }


class SafeDecoder:
    """Decodes raw webdataset samples of this dataset: only our three members, never pickle.

    Callable on a sample (for `.map`): the whole record is checked as our reader checks it
    (dtypes, shapes against the manifest, labels <= 3, finite values, metadata lists), and any
    other member (`.pyd`, `.pickle`, `.pth`, `.npy.gz`, ...) is a `SpecError`.
    """

    def __init__(self, manifest: Manifest) -> None:
        self.channels, self.size = len(manifest.channels), manifest.size
        self.limits = member_limits(manifest.max_record_slices(), self.channels, self.size)

    def select(self, name: str) -> bool:
        """For `WebDataset(select_files=...)`: read only members named `<key>.<our suffix>`."""
        try:
            split_member_name(name.rsplit("/", 1)[-1])
        except SpecError:
            return False
        return True

    def __call__(self, sample: dict) -> dict:
        key = str(sample.get("__key__", ""))
        members = {}
        for name, data in sample.items():
            if name.startswith("__"):
                continue
            members[self._suffix(name)] = self._bounded(name, data)
        record = decode_record(key, members, channels=self.channels, size=self.size)
        return _sample(record, str(sample.get("__url__", "")))

    def handler(self, key: str, data: bytes):
        """For `.decode(decoder.handler, pre=[], post=[])`: one member, by its `.suffix` key."""
        suffix = self._suffix(key)
        data = self._bounded(key, data)
        if suffix == "json":
            return decode_json(data, max_bytes=self.limits["json"], name=key)
        dtype, ndim = (IMAGE_DTYPE, 4) if suffix == "image.npy" else (MASK_DTYPE, 3)
        shape = (None, self.channels, self.size, self.size) if ndim == 4 else (None, self.size, self.size)
        return decode_npy(data, dtype=dtype, ndim=ndim, name=key, shape=shape)

    def _suffix(self, name: str) -> str:
        suffix = name.lstrip(".").lower()
        if suffix not in MEMBER_SUFFIXES:
            raise SpecError(f"member {name!r} is never decoded: only {', '.join(MEMBER_SUFFIXES)} are "
                            "(no pickle, torch.load or gzip)")
        return suffix

    def _bounded(self, name: str, data) -> bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SpecError(f"member {name!r} is not raw bytes (decode with this decoder only)")
        limit = self.limits[self._suffix(name)]
        if len(data) > limit:
            raise SpecError(f"member {name!r} is {len(data)} bytes, more than the {limit} the manifest allows")
        return bytes(data)
