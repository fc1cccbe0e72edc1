"""Inference options: mirroring TTA, checkpoint ensembles and the BraTS post-processing, on
hand-built models and label maps whose right answers are known without the code under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from train.apply import inference
from train.apply.inference import InferenceOptions, LoadedModel, predict_slices
from train.apply.postprocess import relabel_small_et, scaled_threshold

torch.set_num_threads(1)


class Pointwise(nn.Module):
    """A 1x1 convolution: flip-equivariant (mirroring the input mirrors the output exactly)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 3, kernel_size=1)

    def forward(self, x):
        return self.conv(x)


class Ramp(nn.Module):
    """Not equivariant: logits grow with the column and the row index, whatever the input."""

    def forward(self, x):
        b, _, h, w = x.shape
        cols = torch.arange(w, dtype=torch.float32).expand(h, w)
        rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
        return torch.stack([cols - w / 2, rows - h / 2, cols * 0.0]).expand(b, 3, h, w).clone() + x[:, :1] * 0


def loaded_with(*models: nn.Module, options: InferenceOptions = InferenceOptions()) -> LoadedModel:
    return LoadedModel(model=models[0], device=torch.device("cpu"), path=None, channels=["t1ce", "flair"],
                       target="regions", size=8, norm="slice", preprocessing={}, manifest_digest="", epoch=1,
                       variant="v2", config={}, members=list(models), options=options)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_tta_of_a_flip_equivariant_model_equals_no_tta():
    images = np.random.default_rng(0).normal(size=(5, 2, 8, 8)).astype(np.float32)
    model = Pointwise().eval()
    plain = predict_slices(loaded_with(model), images)
    mirrored = predict_slices(loaded_with(model, options=InferenceOptions(tta=True)), images)
    np.testing.assert_allclose(mirrored, plain, atol=1e-6)


def test_tta_averages_the_four_mirrorings_flipped_back():
    h = w = 6
    images = np.zeros((1, 2, h, w), dtype=np.float32)
    got = predict_slices(loaded_with(Ramp(), options=InferenceOptions(tta=True)), images)[0]
    cols = np.arange(w) - w / 2
    rows = np.arange(h) - h / 2
    # the ramp seen through a mirror of W and flipped back runs the other way: (w - 1 - c) - w / 2
    col_views = [sigmoid(cols), sigmoid((w - 1 - np.arange(w)) - w / 2)]
    row_views = [sigmoid(rows), sigmoid((h - 1 - np.arange(h)) - h / 2)]
    expected_cols = (2 * col_views[0] + 2 * col_views[1]) / 4  # W is mirrored in 2 of the 4 views
    expected_rows = (2 * row_views[0] + 2 * row_views[1]) / 4
    np.testing.assert_allclose(got[0], np.broadcast_to(expected_cols, (h, w)), atol=1e-6)
    np.testing.assert_allclose(got[1], np.broadcast_to(expected_rows[:, None], (h, w)), atol=1e-6)
    np.testing.assert_allclose(got[2], 0.5, atol=1e-6)


def test_an_ensemble_of_identical_models_equals_one_and_of_two_is_their_mean():
    images = np.random.default_rng(1).normal(size=(4, 2, 8, 8)).astype(np.float32)
    a, b = Pointwise(0).eval(), Pointwise(1).eval()
    one = predict_slices(loaded_with(a), images)
    np.testing.assert_allclose(predict_slices(loaded_with(a, a, a), images), one, atol=1e-6)
    with torch.no_grad():
        pb = torch.sigmoid(b(torch.from_numpy(images))).numpy()
    np.testing.assert_allclose(predict_slices(loaded_with(a, b), images), (one + pb) / 2, atol=1e-6)


def test_load_ensemble_refuses_checkpoints_of_another_target(tmp_path, monkeypatch):
    def fake_load(path, device="auto", *, onnx=False, batch_size=32):
        target = "classes" if "b" in str(path) else "regions"
        return LoadedModel(model=Pointwise(), device=torch.device("cpu"), path=path, channels=["t1ce", "flair"],
                           target=target, size=8, norm="slice", preprocessing={}, manifest_digest="", epoch=1,
                           variant="v2", config={}, members=[Pointwise()])

    monkeypatch.setattr(inference, "load_model", fake_load)
    with pytest.raises(inference.InferenceError, match="b.pt: cannot be ensembled with a.pt: its target differ"):
        inference.load_ensemble(["a.pt", "b.pt"], "cpu")
    assert len(inference.load_ensemble(["a.pt", "c.pt"], "cpu").members) == 2


def test_small_et_is_relabelled_nec_and_nothing_else_moves():
    labels = np.zeros((10, 10, 4), dtype=np.uint8)
    labels[2:8, 2:8, :] = 2  # edema
    labels[4:6, 4:6, 1] = 1  # necrosis
    labels[4:6, 4:6, 2] = 3  # 4 ET voxels
    small = relabel_small_et(labels, 5)
    assert (small == 3).sum() == 0 and (small == 1).sum() == 8
    assert np.array_equal(small > 0, labels > 0)  # whole tumour unchanged
    assert np.array_equal(np.isin(small, (1, 3)), np.isin(labels, (1, 3)))  # tumour core unchanged
    assert np.array_equal(relabel_small_et(labels, 4), labels)  # 4 voxels is not fewer than 4
    assert np.array_equal(relabel_small_et(labels, 0), labels)  # off
    none = labels.copy()
    none[none == 3] = 1
    assert np.array_equal(relabel_small_et(none, 100), none)
    assert labels[4, 4, 2] == 3  # the input is not modified


def test_threshold_scales_with_the_in_plane_area():
    assert scaled_threshold(200, [240, 240, 155], 120) == 50  # a quarter of the pixels per slice
    assert scaled_threshold(200, None, 120) == 200
    assert scaled_threshold(0, [240, 240, 155], 120) == 0
