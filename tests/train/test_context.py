"""2.5D input (`--context K`): neighbour stacking at patient edges and gaps, the same stack in
training, evaluation and prediction, and a run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shards_spec.read import ShardStore
from tests.helpers.train_runs import options, quiet
from train import fit
from train.apply.inference import context_window
from train.data import ShardDataset, stack_context, stack_volume

torch.set_num_threads(1)


def patient(slice_index):
    """Slices whose every pixel of channel c holds 10 * source index + c: a stack is readable by eye."""
    s = len(slice_index)
    image = np.zeros((s, 2, 3, 3), dtype=np.float16)
    for j, z in enumerate(slice_index):
        for c in range(2):
            image[j, c] = 10 * z + c
    return image


def values(stacked):
    return [float(stacked[k, 0, 0]) for k in range(stacked.shape[0])]


def test_neighbours_nearest_first_and_zeros_at_the_edges_and_gaps():
    index = [10, 11, 12, 14]  # 13 has no brain: the ETL dropped it
    image = patient(index)
    positions = {z: j for j, z in enumerate(index)}
    # slice 11 with K=2: itself, then 10, 12, then 9 (not stored: zeros) and 13 (dropped: zeros)
    assert values(stack_context(image, index, positions, 1, [0, 1], 2)) == [110, 111, 100, 101, 120, 121, 0, 0, 0, 0]
    # the first slice has no lower neighbour
    assert values(stack_context(image, index, positions, 0, [1], 1)) == [101, 0, 111]
    # a gap is not bridged: 12's upper neighbour 13 is missing even though 14 is stored
    assert values(stack_context(image, index, positions, 2, [0], 1)) == [120, 110, 0]
    assert stack_context(image, index, positions, 3, [0, 1], 0).shape == (2, 3, 3)  # K = 0: the slice alone
    stacked = stack_volume(image, index, 1)
    assert stacked.shape == (4, 6, 3, 3)
    assert values(stacked[3]) == [140, 141, 0, 0, 0, 0]


def test_a_volume_window_stacks_as_the_whole_volume_does():
    image = patient(list(range(7)))
    whole = stack_volume(image, range(7), 2)
    for start, stop in ((0, 3), (2, 5), (4, 7)):
        assert np.array_equal(context_window(image, start, stop, 2), whole[start:stop])


def test_the_dataset_yields_stacked_images_and_a_run_trains_and_evaluates(shards, tmp_path):  # noqa: F811
    from train.apply import evaluate

    store = ShardStore(shards)
    plain = list(ShardDataset(store, "val", channels=["t1ce", "flair"], shuffle=False))
    stacked = list(ShardDataset(store, "val", channels=["t1ce", "flair"], shuffle=False, context=1))
    assert len(plain) == len(stacked) and stacked[0][0].shape[0] == 6
    for (p_img, p_mask), (s_img, s_mask) in zip(plain, stacked):
        assert torch.equal(s_img[:2], p_img) and torch.equal(s_mask, p_mask)  # the slice's own channels first
    # the neighbours of the val patient's slices are its other slices (consecutive indices)
    assert torch.equal(stacked[1][0][2:4], plain[0][0]) and torch.equal(stacked[1][0][4:6], plain[2][0])
    assert torch.count_nonzero(stacked[0][0][2:4]) == 0  # below the first slice: background

    out = tmp_path / "run"
    result = fit.run(options(shards, out, context=1, epochs=1), hooks=quiet())
    assert result.exit_code == 0
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert last["model"]["in_channels"] == 6 and last["config"]["context"] == 1
    results = evaluate.main(checkpoint=out / "checkpoints" / "best.pt", shards=str(shards), device="cpu",
                            workers=0, console=quiet().console)
    row = last["history"][0]
    # the slice level is the trainer's validation, stacked the same way: the same counts and scores
    for name in ("NEC/NET", "ED", "ET"):
        logged, evaluated = row[f"dice_{name}"], results["slice_level"]["dice"][name]
        assert (np.isnan(logged) and np.isnan(evaluated)) or logged == evaluated
    with pytest.raises(Exception, match="--context: must be in 0..3"):
        fit.run(options(shards, tmp_path / "x", context=4), hooks=quiet())
