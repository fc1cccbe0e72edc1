import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shards_spec.preprocess import brain_mask, normalise, preprocess_volume, resize_labels


def _volume(rng, shape=(4, 32, 32, 6)):
    volume = rng.uniform(100, 1000, size=shape).astype(np.float32)
    volume[:, :6] = 0  # background rows, as in a skull-stripped scan
    return volume


def test_per_slice_zscore_over_brain_voxels():
    rng = np.random.default_rng(0)
    volume = _volume(rng)
    brain = brain_mask(volume)
    out = normalise(volume, brain, "slice")
    for c in range(4):
        for z in range(volume.shape[-1]):
            values = out[c, ..., z][brain[..., z]]
            assert abs(values.mean()) < 1e-5
            assert abs(values.std() - 1) < 1e-4
    assert np.all(out[:, ~brain] == 0)


def test_per_volume_zscore_uses_the_whole_volume():
    rng = np.random.default_rng(1)
    volume = _volume(rng)
    volume[..., 0] *= 3  # one slice brighter: per volume keeps the difference
    brain = brain_mask(volume)
    out = normalise(volume, brain, "volume")
    for c in range(4):
        values = out[c][brain]
        assert abs(values.mean()) < 1e-5 and abs(values.std() - 1) < 1e-4
    assert out[0, ..., 0][brain[..., 0]].mean() > out[0, ..., 1][brain[..., 1]].mean() + 0.5


def test_slice_without_brain_and_slice_with_one_voxel():
    volume = np.zeros((4, 8, 8, 2), dtype=np.float32)
    volume[:, 3, 3, 1] = [5, 6, 7, 8]
    brain = brain_mask(volume)
    out = normalise(volume, brain, "slice")
    assert np.all(out[..., 0] == 0)
    assert np.all(out[:, 3, 3, 1] == 0)  # one voxel: centred, not scaled
    assert np.all(np.isfinite(out))


def test_empty_slices_are_dropped_unless_kept():
    volume = np.zeros((4, 16, 16, 5), dtype=np.float32)
    volume[:, 4:12, 4:12, 1:3] = 7.0
    brain = brain_mask(volume)
    kept = preprocess_volume(volume, brain, None, size=8)
    assert kept.slice_index == [1, 2]
    everything = preprocess_volume(volume, brain, None, size=8, keep_empty=True)
    assert everything.slice_index == [0, 1, 2, 3, 4]
    assert everything.image.shape == (5, 4, 8, 8) and everything.image.dtype == np.float16
    assert np.all(everything.image[0] == 0)


def test_recipe_matches_an_independent_computation():
    rng = np.random.default_rng(2)
    volume = _volume(rng, (4, 40, 40, 3))
    brain = brain_mask(volume)
    labels = np.zeros((40, 40, 3), dtype=np.uint8)
    labels[15:25, 15:30] = 2
    labels[18:22, 18:22] = 3
    out = preprocess_volume(volume, brain, labels, size=16)
    z = 1
    sl = volume[..., z].astype(np.float64)
    b = brain[..., z]
    expected = np.zeros_like(sl)
    for c in range(4):
        m, s = sl[c][b].mean(), sl[c][b].std()
        expected[c][b] = (sl[c][b] - m) / s
    resized = F.interpolate(torch.tensor(expected[None], dtype=torch.float32), size=(16, 16),
                            mode="bilinear", antialias=True, align_corners=False)[0].numpy()
    rb = F.interpolate(torch.tensor(b[None, None], dtype=torch.float32), size=(16, 16), mode="nearest-exact")[0, 0].numpy() > 0
    expected_image = np.where(rb, resized, 0).astype(np.float16)
    np.testing.assert_array_equal(out.image[z], expected_image)
    lab = F.interpolate(torch.tensor(labels[None, None, :, :, z], dtype=torch.float32), size=(16, 16), mode="nearest-exact")[0, 0].numpy()
    np.testing.assert_array_equal(out.mask[z], lab.astype(np.uint8))
    assert out.class_voxels[z] == np.bincount(out.mask[z].ravel(), minlength=4).tolist()
    assert out.brain_voxels[z] == int(rb.sum())


def test_background_stays_exactly_zero_after_resize():
    rng = np.random.default_rng(3)
    volume = _volume(rng, (4, 50, 50, 2))
    out = preprocess_volume(volume, brain_mask(volume), None, size=20)
    resized_brain = resize_labels(np.moveaxis(brain_mask(volume), -1, 0), 20).astype(bool)
    assert np.all(out.image[:, :, ~resized_brain[0]] == 0)
    assert np.any(out.image[:, :, resized_brain[0]] != 0)


@pytest.mark.parametrize("size", [7, 16, 33, 64])
def test_resize_never_invents_labels(size):
    rng = np.random.default_rng(size)
    labels = rng.choice([0, 1, 3], size=(2, 37, 41)).astype(np.uint8)
    out = resize_labels(labels, size)
    assert set(np.unique(out)) <= {0, 1, 3}
    assert out.shape == (2, size, size)


@pytest.mark.parametrize("norm", ["slice", "volume"])
@pytest.mark.parametrize("keep_empty", [False, True])
def test_slabs_give_the_same_bytes_as_one_pass_over_the_volume(norm, keep_empty):
    from shards_spec.preprocess import SLAB_SLICES, _preprocess_slab, zscore_stats

    rng = np.random.default_rng(0)
    depth = 3 * SLAB_SLICES + 3
    volume = rng.normal(100, 20, (4, 40, 36, depth)).astype(np.float32)
    volume[:, :5] = 0
    volume[..., :SLAB_SLICES + 1] = 0  # a whole empty slab, and one more empty slice
    volume[..., 2 * SLAB_SLICES + 2] = 0
    labels = rng.integers(0, 4, (40, 36, depth)).astype(np.uint8)
    brain = brain_mask(volume)
    stats = zscore_stats(volume, brain, "volume") if norm == "volume" else None
    whole = _preprocess_slab(volume, brain, labels, 0, size=24, norm=norm, stats=stats, keep_empty=keep_empty)
    slabs = preprocess_volume(volume, brain, labels, size=24, norm=norm, keep_empty=keep_empty)
    assert whole.image.tobytes() == slabs.image.tobytes() and whole.mask.tobytes() == slabs.mask.tobytes()
    assert (whole.slice_index, whole.class_voxels, whole.brain_voxels) == \
        (slabs.slice_index, slabs.class_voxels, slabs.brain_voxels)
    assert len(slabs.slice_index) == (depth if keep_empty else depth - SLAB_SLICES - 2)
