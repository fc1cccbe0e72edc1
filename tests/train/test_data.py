import logging
import math
from collections import Counter

import numpy as np
import pytest
import torch

from shards_spec.errors import SpecError
from tests.shard_fixtures import decode_code, make_shards, sample_code, serve_range_http
from train.data import ShardDataset, ShardLoader, iter_patients

UNEVEN = {"a": 3, "b": 5, "c": 4, "d": 6, "e": 2, "f": 7, "g": 1}
EVEN = {"a": 4, "b": 4, "c": 4, "d": 4}


def _codes(samples):
    return [decode_code(image) for image, _mask in samples]


def _all_codes(patients):
    return sorted(sample_code(i, s) for i, n in enumerate(patients.values()) for s in range(n))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("uneven"), "webdataset", patients=UNEVEN)


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
@pytest.mark.parametrize("target", ["classes", "regions"])
def test_samples_hold_the_known_values(tmp_path, fmt, target):
    root = make_shards(tmp_path, fmt, patients={"p1": 2, "p2": 3})
    ds = ShardDataset(root, "train", channels=["flair", "t1ce"], target=target, shuffle=False)
    samples = list(ds)
    assert len(samples) == ds.num_slices == 5
    image, mask = samples[3]  # p2, slice 1 (manifest order, no shuffle)
    assert image.dtype == mask.dtype == torch.float32
    assert image.shape == (2, 16, 16) and mask.shape == (3, 16, 16)
    code = sample_code(1, 1)
    assert torch.all(image[0] == code * 4 + 3) and torch.all(image[1] == code * 4 + 1)  # flair, t1ce
    assert not mask.any()  # odd slices have no tumour
    _, mask = samples[2]  # p2, slice 0: labels 1, 2, 3 at row 0, columns 0..2
    expected = {"classes": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "regions": [[1, 1, 1], [1, 0, 1], [0, 0, 1]]}[target]
    assert mask[:, 0, :3].tolist() == expected
    assert mask.sum() == sum(map(sum, expected))


def test_unknown_channel_and_bad_arguments_are_refused(tmp_path, uneven):
    two = make_shards(tmp_path, "webdataset", patients={"a": 1}, channels=2)  # t1, t1ce only
    with pytest.raises(SpecError, match=r"\['flair'\] are not in this dataset; it has \['t1', 't1ce'\]"):
        ShardDataset(two, "train", channels=["t1ce", "flair"])
    with pytest.raises(ValueError, match="distinct names"):
        ShardDataset(uneven, "train", channels=["t1", "t1"])
    with pytest.raises(ValueError, match="policy"):
        ShardDataset(uneven, "train", policy="ignore")
    with pytest.raises(SpecError, match="split 'val'"):
        ShardDataset(uneven, "val")


def test_every_sample_once_per_epoch_with_two_loader_workers(uneven):
    ds = ShardDataset(uneven, "train", shuffle_buffer=8, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)  # reaches the persistent workers through shared memory
        codes = [decode_code(image) for images, _ in loader for image in images]
        assert sorted(codes) == _all_codes(UNEVEN)
        epochs.append(codes)
    assert epochs[0] != epochs[1]
    # The loader's order is the workers' planned streams, interleaved batch by batch.
    streams = [_codes(ds.iter_worker(w, 2, epoch=1)) for w in range(2)]
    batches = [s[i:i + 4] for i in range(0, max(map(len, streams)), 4) for s in streams if s[i:i + 4]]
    assert epochs[1] == [c for batch in batches for c in batch]


def test_every_sample_once_across_two_ranks_and_two_workers(tmp_path):
    root = make_shards(tmp_path, "zarr", patients=EVEN)
    seen = []
    for rank in range(2):
        ds = ShardDataset(root, "train", rank=rank, world_size=2, batch_size=2, shuffle_buffer=3, seed=1)
        ds.set_epoch(5)
        for worker in range(2):
            seen += _codes(ds.iter_worker(worker, 2))
        assert ds.samples_per_epoch(num_workers=2) == 8
    assert sorted(seen) == _all_codes(EVEN)


def _rank_batches(root, rank, epoch, batch_size=2, workers=2, **kwargs):
    ds = ShardDataset(root, "train", rank=rank, world_size=2, batch_size=batch_size, shuffle_buffer=5, **kwargs)
    ds.set_epoch(epoch)
    streams = [_codes(ds.iter_worker(w, workers)) for w in range(workers)]
    assert [len(s) for s in streams] == ds.quotas(workers)
    assert ds.batches_per_epoch(batch_size, workers) == sum(math.ceil(len(s) / batch_size) for s in streams)
    return streams, ds


def test_ranks_get_equal_full_batches_with_uneven_shards(uneven):
    cut_sets = []
    for epoch in range(3):
        per_rank = [_rank_batches(uneven, rank, epoch) for rank in range(2)]
        counts = [sum(len(s) for s in streams) for streams, _ in per_rank]
        assert counts[0] == counts[1] > 0 and counts[0] % 2 == 0
        assert all(len(s) % 2 == 0 for streams, _ in per_rank for s in streams)  # every batch full
        assert counts[0] == per_rank[0][1].samples_per_epoch(2)
        seen = [c for streams, _ in per_rank for s in streams for c in s]
        assert len(seen) == len(set(seen)) and set(seen) <= set(_all_codes(UNEVEN))
        assert len(seen) >= sum(UNEVEN.values()) - 2 * 2 * 2 - max(UNEVEN.values())  # the cut is small
        cut_sets.append(frozenset(_all_codes(UNEVEN)) - set(seen))
    assert len(set(cut_sets)) > 1  # a different remainder each epoch


def test_validation_is_not_cut_and_split_across_ranks(uneven):
    seen = []
    for rank in range(2):
        ds = ShardDataset(uneven, "train", shuffle=False, rank=rank, world_size=2, batch_size=4)
        seen += _codes(ds)
    assert sorted(seen) == _all_codes(UNEVEN)


def test_shuffle_changes_by_epoch_and_is_fixed_by_seed(uneven):
    def order(seed, epoch):
        ds = ShardDataset(uneven, "train", shuffle_buffer=6, seed=seed)
        ds.set_epoch(epoch)
        return _codes(ds)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == _all_codes(UNEVEN)


def test_oversampled_tumour_slices_count_in_the_epoch(tmp_path):
    patients = {"a": 4, "b": 3}
    root = make_shards(tmp_path, "webdataset", patients=patients, tumour_every=2)
    ds = ShardDataset(root, "train", oversample_tumour=3, shuffle_buffer=4)
    counts = Counter(_codes(ds))
    tumour = {sample_code(i, s) for i, n in enumerate(patients.values()) for s in range(0, n, 2)}
    assert all(counts[c] == (3 if c in tumour else 1) for c in _all_codes(patients))
    assert ds.num_slices == sum(counts.values()) == 7 + 2 * 4


def test_memory_bound_is_positive_and_grows_with_the_buffer(uneven):
    small = ShardDataset(uneven, "train", shuffle_buffer=10)
    large = ShardDataset(uneven, "train", shuffle_buffer=1000)
    assert 0 < small.memory_bound() < large.memory_bound()
    assert large.memory_bound(num_workers=2) > large.memory_bound()
    assert small.memory_bound(batch_size=32) > small.memory_bound(batch_size=1)
    hw = 16 * 16
    assert large.memory_bound() - small.memory_bound() == 990 * (4 * hw * 2 + hw)


def _corrupt_shard(root, index):
    from shards_spec.read import ShardStore

    shard = ShardStore(root).manifest.shards_of("train")[index]
    path = root / shard["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return shard


def test_policy_fail_names_the_bad_shard_and_skip_counts_it(tmp_path, caplog):
    root = make_shards(tmp_path, "webdataset", patients={"a": 3, "b": 5, "c": 4})
    bad = _corrupt_shard(root, 1)
    with pytest.raises(SpecError, match=bad["path"]):
        list(ShardDataset(root, "train", policy="fail"))
    ds = ShardDataset(root, "train", policy="skip", shuffle_buffer=4)
    with caplog.at_level(logging.WARNING, logger="train.data.dataset"):
        codes = _codes(ds)
    assert sorted(codes) == sorted(c for c in _all_codes({"a": 3, "b": 5, "c": 4}) if not 64 <= c < 128)
    assert ds.skipped == {"shards": 1, "slices": 5}
    assert bad["path"] in caplog.text and "skipped 1 bad shard" in caplog.text


def test_skip_keeps_ddp_quotas_by_rereading_good_shards(tmp_path):
    patients = {"a": 4, "b": 4, "c": 4, "d": 4}
    root = make_shards(tmp_path, "webdataset", patients=patients)
    _corrupt_shard(root, 0)
    for rank in range(2):
        ds = ShardDataset(root, "train", rank=rank, world_size=2, batch_size=2, policy="skip", shuffle_buffer=3)
        codes = _codes(ds)
        assert len(codes) == ds.num_slices == 8
        assert not any(0 <= c < 64 for c in codes)  # nothing of the bad shard a


def test_iter_patients_gives_whole_patients_in_manifest_order(tmp_path):
    patients = {"a": 2, "b": 3, "c": 1}
    root = make_shards(tmp_path, "zarr", patients=patients, splits={"train": ["a"], "val": ["b", "c"]})
    got = list(iter_patients(root, "val", channels=["t2"]))
    assert [p.patient for p in got] == ["b", "c"]
    b = got[0]
    assert b.image.shape == (3, 1, 16, 16) and b.image.dtype == np.float16
    assert float(b.image[2, 0, 5, 5]) == sample_code(1, 2) * 4 + 2
    assert b.slice_index == [10, 11, 12] and b.mask.shape == (3, 16, 16) and b.info["source_shape"] == [16, 16, 64]
    shares = [[p.patient for p in iter_patients(root, ["train", "val"], rank=r, world_size=2)] for r in range(2)]
    assert shares == [["a", "c"], ["b"]]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_http_with_loader_workers_gives_the_local_samples(tmp_path, fmt):
    patients = {"a": 3, "b": 2, "c": 4}
    root = make_shards(tmp_path, fmt, patients=patients)
    local = ShardDataset(root, "train", shuffle_buffer=4, seed=2)
    with serve_range_http(tmp_path) as url:
        remote = ShardDataset(f"{url}/{root.name}", "train", shuffle_buffer=4, seed=2, cache_dir=tmp_path / "cache")
        loader = torch.utils.data.DataLoader(remote, batch_size=3, num_workers=2 if fmt == "zarr" else 0)
        got = [(decode_code(i), m) for images, masks in loader for i, m in zip(images, masks)]
    expected = [(decode_code(i), m) for i, m in local]
    assert sorted(c for c, _ in got) == _all_codes(patients)
    if fmt == "webdataset":  # same process, same plan: the same order and values
        assert [c for c, _ in got] == [c for c, _ in expected]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, expected))


def test_shuffle_buffer_starts_at_an_eighth_and_never_holds_more_than_its_length():
    class Buffer:  # the attributes `_mixed` reads
        shuffle, shuffle_buffer = True, 64

    consumed = []

    def source():
        for i in range(1000):
            consumed.append(i)
            yield i

    out, first_after, most_in_flight = [], None, 0
    for item in ShardDataset._mixed(Buffer(), source(), np.random.default_rng(5)):
        if first_after is None:
            first_after = len(consumed)
        out.append(item)
        most_in_flight = max(most_in_flight, len(consumed) - len(out))
    assert sorted(out) == list(range(1000))  # every sample exactly once
    assert first_after == 64 // 8  # the first batch does not wait for a full buffer
    assert most_in_flight <= 64  # the memory bound's buffer length holds
    assert out != list(range(1000))


def _batches(loader):
    return [(image.clone(), mask.clone()) for image, mask in loader]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("target, context, drop_last", [("classes", 0, False), ("regions", 1, True)])
def test_shard_loader_gives_the_batches_of_a_dataloader(uneven, workers, target, context, drop_last):
    ds = ShardDataset(uneven, "train", channels=["flair", "t1"], target=target, context=context, shuffle_buffer=6,
                      seed=4)
    ds.set_epoch(1)
    expected = _batches(torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers, drop_last=drop_last))
    loader = ShardLoader(ds, batch_size=3, num_workers=workers, drop_last=drop_last)
    got = _batches(loader)
    assert len(got) == len(expected) == len(loader) > 0
    for (image, mask), (want_image, want_mask) in zip(got, expected):
        assert image.dtype == mask.dtype == torch.float32
        assert image.shape == want_image.shape and mask.shape == want_mask.shape
        assert torch.equal(image, want_image) and torch.equal(mask, want_mask)
    assert sorted(decode_code(i[:1]) for image, _ in got for i in image) == sorted(
        decode_code(i[:1]) for image, _ in expected for i in image)


def test_shard_loader_keeps_its_workers_across_epochs_and_refuses_what_it_does_not_take(uneven):
    ds = ShardDataset(uneven, "train", shuffle_buffer=8, seed=3)
    loader = ShardLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)
    for epoch in range(2):
        ds.set_epoch(epoch)  # reaches the persistent workers through shared memory
        codes = [decode_code(image) for images, _ in loader for image in images]
        assert sorted(codes) == _all_codes(UNEVEN) and len(codes) == len(ds)
    with pytest.raises(ValueError, match="no collate_fn"):
        ShardLoader(ds, batch_size=4, collate_fn=lambda batch: batch)
    with pytest.raises(TypeError, match="ShardDataset"):
        ShardLoader(list(range(4)), batch_size=2)


def test_len_is_the_slices_of_this_rank_per_epoch(uneven):
    ds = ShardDataset(uneven, "train", shuffle=False)
    assert len(ds) == ds.num_slices == sum(UNEVEN.values()) == len(list(ds))
    assert len(torch.utils.data.DataLoader(ds, batch_size=4)) == math.ceil(len(ds) / 4)
    ranks = [ShardDataset(uneven, "train", rank=r, world_size=2, batch_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == ranks[0].samples_per_epoch() and len(ranks[0]) % 2 == 0


def test_a_worker_reuses_a_shared_batch_only_once_the_main_process_released_it(uneven):
    from train.data.loader import RING, ShardBatches

    batches = ShardBatches(ShardDataset(uneven, "train"), 4)
    batches.released = torch.zeros((2, RING), dtype=torch.int64)
    shapes = ((4, 4, 16, 16), (4, 16, 16))
    first = [batches._slot(1, *shapes) for _ in range(RING)]
    assert [ticket[:2] for *_, ticket in first] == [(1, (g + 1) % RING) for g in range(RING)]
    again = batches._slot(1, *shapes)  # slot 1 again: its batch was never released, so a new one
    assert again[2] == (1, 1, RING + 1) and again[0].data_ptr() != first[0][0].data_ptr()
    batches.released[1, 2] = first[1][2][2]  # the main process converted the batch of slot 2
    reused = batches._slot(1, *shapes)
    assert reused[2][1] == 2 and reused[0].data_ptr() == first[1][0].data_ptr()
    assert reused[1].data_ptr() == first[1][1].data_ptr()
    batches.released[1, 3] = 999  # a release of another generation frees nothing
    assert batches._slot(1, *shapes)[0].data_ptr() != first[2][0].data_ptr()
