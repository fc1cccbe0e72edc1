"""Augmentation: alignment of image and mask, known flips, identity, reproducibility, ranges."""

from __future__ import annotations

import io
import math

import pytest
import torch

from train.recipe.augment import AugConfig, Augmenter, AugParams, Intensity, apply, sample_params

torch.set_num_threads(1)


def blobs(batch: int, size: int, seed: int) -> torch.Tensor:
    """Label maps (B, H, W) uint8 with a few discs of labels 1..3 (tumour-like, not noise)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(batch, size, size, dtype=torch.uint8)
    for b in range(batch):
        for label in (2, 1, 3):
            cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=g).tolist()
            r = size / 10 + torch.rand((), generator=g).item() * size / 8
            labels[b][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = label
    return labels


def one_hot_image(labels: torch.Tensor) -> torch.Tensor:
    """Image whose channel c is 1.0 where the label is c + 1: the mask written as intensities."""
    return torch.stack([(labels == c + 1).float() for c in range(3)], dim=1)


def test_image_and_mask_stay_aligned():
    labels = blobs(6, 48, seed=0)
    image = one_hot_image(labels)
    params = sample_params(6, 3, torch.Generator().manual_seed(1), AugConfig(p_flip=0.5, intensity=None))
    out_image, out_mask = apply(image, labels, params)
    assert out_mask.dtype == torch.uint8
    # Bilinear at 0 (or 1) means all four neighbours of the sampling point are 0 (or 1); nearest
    # picks one of those four, so the mask must agree there. A shift of one voxel would not.
    covered = 0
    for c in range(3):
        zero, one = out_image[:, c] < 1e-4, out_image[:, c] > 1 - 1e-4
        assert (out_mask[one] == c + 1).all()
        assert (out_mask[zero] != c + 1).all()
        covered += int(one.sum())
    assert covered > 0.5 * int((out_mask > 0).sum())  # the check is not vacuous


def test_label_map_and_channel_masks_agree():
    labels = blobs(3, 32, seed=2)
    params = sample_params(3, 1, torch.Generator().manual_seed(3))
    image = torch.randn(3, 1, 32, 32)
    _, warped_labels = apply(image, labels, params)
    _, warped_channels = apply(image, one_hot_image(labels).bool(), params)
    assert warped_channels.dtype == torch.bool
    assert torch.equal(one_hot_image(warped_labels).bool(), warped_channels)
    # float channels, as the loader yields them, and long label maps
    _, warped_float = apply(image, one_hot_image(labels), params)
    assert warped_float.dtype == torch.float32 and torch.equal(warped_float.bool(), warped_channels)
    _, warped_long = apply(image, labels.long(), params)
    assert torch.equal(warped_long, warped_labels.long())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_matches_cpu():
    labels, image = blobs(4, 32, seed=10), torch.randn(4, 2, 32, 32)
    cpu = Augmenter(3)(image, labels)
    gpu = Augmenter(3)(image.cuda(), labels.cuda())
    assert gpu[0].is_cuda and torch.allclose(gpu[0].cpu(), cpu[0], atol=1e-4)
    assert (gpu[1].cpu() != cpu[1]).float().mean() < 0.01  # nearest ties may round differently


def test_flips_land_where_expected():
    image = torch.zeros(2, 1, 8, 12)
    image[:, 0, 1, 2] = 5.0  # one bright voxel, asymmetric in both axes
    labels = (image[:, 0] > 0).to(torch.uint8)
    params = AugParams.identity(2, 1)
    params.flip_w = torch.tensor([True, False])
    params.flip_h = torch.tensor([False, True])
    out_image, out_mask = apply(image, labels, params)
    assert out_mask[0].nonzero().tolist() == [[1, 12 - 1 - 2]]
    assert out_mask[1].nonzero().tolist() == [[8 - 1 - 1, 2]]
    assert torch.allclose(out_image[0, 0, 1, 9], torch.tensor(5.0), atol=1e-4)
    assert torch.allclose(out_image[1, 0, 6, 2], torch.tensor(5.0), atol=1e-4)


def test_rotation_by_90_degrees_on_non_square_grid_is_not_sheared():
    # a centred 2x6 bar in a 16x24 image, rotated 90 degrees, is a centred 6x2 bar
    labels = torch.zeros(1, 16, 24, dtype=torch.uint8)
    labels[0, 7:9, 9:15] = 1
    params = AugParams.identity(1, 1)
    params.angle = torch.tensor([90.0])
    _, out = apply(torch.zeros(1, 1, 16, 24), labels, params)
    rows, cols = out[0].nonzero().unbind(1)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5, 10, 11, 12)


def test_identity_params_change_nothing():
    labels = blobs(2, 32, seed=4)
    image = torch.randn(2, 4, 32, 32) * (labels[:, None] > 0)
    out_image, out_mask = apply(image, labels, AugParams.identity(2, 4))
    assert torch.equal(out_mask, labels)
    assert torch.allclose(out_image, image, atol=1e-5)


def test_same_seed_same_output_different_seed_differs():
    labels = blobs(4, 32, seed=5)
    image = torch.randn(4, 2, 32, 32)
    a = Augmenter(7)(image, labels)
    b = Augmenter(7)(image, labels)
    c = Augmenter(8)(image, labels)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_state_round_trips_through_a_weights_only_checkpoint():
    labels, image = blobs(2, 16, seed=6), torch.randn(2, 2, 16, 16)
    aug = Augmenter(0)
    aug(image, labels)
    buffer = io.BytesIO()
    torch.save({"augment": aug.state()}, buffer)
    expected = aug(image, labels)
    buffer.seek(0)
    restored = Augmenter(123)
    restored.set_state(torch.load(buffer, weights_only=True)["augment"])
    assert aug.state().dtype == torch.uint8
    got = restored(image, labels)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_params_lie_within_ranges():
    config = AugConfig(p_flip=0.3, rot_deg=15, scale=(0.9, 1.1), intensity=Intensity(0.1, 0.2, (0.8, 1.25)))
    p = sample_params(2000, 4, torch.Generator().manual_seed(0), config)
    assert p.angle.abs().max() <= 15 and p.angle.abs().max() > 14
    assert p.zoom.min() >= 0.9 and p.zoom.max() <= 1.1
    assert ((p.gain >= 0.9) & (p.gain <= 1.1)).all()
    assert p.offset.abs().max() <= 0.2
    assert p.gamma.min() >= 0.8 and p.gamma.max() <= 1.25
    assert math.isclose(p.gamma.log().mean().item(), (math.log(0.8) + math.log(1.25)) / 2, abs_tol=0.01)
    for flips in (p.flip_w, p.flip_h):
        assert abs(flips.float().mean().item() - 0.3) < 0.05


def test_intensity_keeps_background_zero_and_changes_brain():
    labels = blobs(2, 32, seed=8)
    brain = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    brain[:, :, 4:28, 4:28] = True
    image = torch.randn(2, 3, 32, 32) * brain
    params = sample_params(2, 3, torch.Generator().manual_seed(9), AugConfig(p_flip=0, rot_deg=0, scale=(1, 1)))
    out, _ = apply(image, labels, params)
    assert (out[~brain.expand_as(out)] == 0).all()
    assert not torch.allclose(out[brain.expand_as(out)], image[brain.expand_as(image)])


def test_gamma_keeps_the_brain_range_of_each_channel():
    image = torch.zeros(1, 2, 16, 16)
    image[:, :, 2:14, 2:14] = torch.linspace(-2, 3, 144).reshape(12, 12)
    params = AugParams.identity(1, 2)
    params.gamma = torch.tensor([[0.5, 2.0]])
    out, _ = apply(image, torch.zeros(1, 16, 16, dtype=torch.uint8), params)
    inside = out[:, :, 2:14, 2:14]
    assert torch.allclose(inside.amin(dim=(2, 3)), torch.tensor([[-2.0, -2.0]]), atol=1e-4)
    assert torch.allclose(inside.amax(dim=(2, 3)), torch.tensor([[3.0, 3.0]]), atol=1e-4)
    middle = image[0, 0, 8, 8]  # gamma < 1 lifts the middle of the range, > 1 lowers it
    assert out[0, 0, 8, 8] > middle > out[0, 1, 8, 8]


def test_bad_arguments():
    with pytest.raises(ValueError, match="p_flip"):
        Augmenter(0, p_flip=1.5)
    with pytest.raises(ValueError, match="scale"):
        Augmenter(0, scale=(1.1, 0.9))
    with pytest.raises(ValueError, match="mask must be"):
        apply(torch.zeros(1, 2, 8, 8), torch.zeros(1, 8, 4), AugParams.identity(1, 2))
