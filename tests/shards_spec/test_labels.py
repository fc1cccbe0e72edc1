import numpy as np
import pytest

from shards_spec.errors import SourceError
from shards_spec.labels import (
    class_voxels,
    decode_labels,
    encode_labels,
    encode_onehot,
    expand,
    to_classes,
    to_regions,
)


def test_brats2020_labels_map_4_to_3():
    seg = np.array([[0, 1], [2, 4]], dtype=np.int16)
    assert encode_labels(seg, "brats2020").tolist() == [[0, 1], [2, 3]]


def test_brats2023_labels_are_kept():
    seg = np.array([0, 1, 2, 3], dtype=np.uint8)
    assert encode_labels(seg, "brats2023").tolist() == [0, 1, 2, 3]


def test_float_segmentation_with_integral_values_is_accepted():
    seg = np.array([0.0, 4.0, 2.0], dtype=np.float32)
    assert encode_labels(seg, "brats2020").tolist() == [0, 3, 2]


@pytest.mark.parametrize("convention, bad", [("brats2020", 3), ("brats2023", 4), ("brats2020", 7)])
def test_labels_outside_the_convention_are_refused_naming_file_and_value(convention, bad):
    seg = np.array([0, 1, bad])
    with pytest.raises(SourceError) as info:
        encode_labels(seg, convention, path="p/seg.nii")
    assert "p/seg.nii" in str(info.value) and str(bad) in str(info.value)


def test_non_integer_labels_are_refused():
    with pytest.raises(SourceError, match="non-integer"):
        encode_labels(np.array([0.5, 1.0]), "brats2020")


@pytest.mark.parametrize("convention, values", [("brats2020", [0, 1, 2, 4]), ("brats2023", [0, 1, 2, 3])])
def test_decode_is_the_inverse_of_encode(convention, values):
    seg = np.array(values * 3, dtype=np.uint8)
    assert decode_labels(encode_labels(seg, convention), convention).tolist() == seg.tolist()


def test_kaggle_onehot_masks():
    mask = np.zeros((2, 2, 3), dtype=np.uint8)
    mask[0, 1, 0] = 1  # NEC/NET
    mask[1, 0, 1] = 1  # ED
    mask[1, 1, 2] = 1  # ET
    assert encode_onehot(mask).tolist() == [[0, 1], [2, 3]]


def test_kaggle_overlapping_channels_are_refused():
    mask = np.zeros((1, 1, 3), dtype=np.uint8)
    mask[0, 0, :2] = 1
    with pytest.raises(SourceError, match="overlap"):
        encode_onehot(mask, path="volume_1_slice_0.h5")


def test_kaggle_non_binary_and_wrong_shape_are_refused():
    with pytest.raises(SourceError, match="values other than 0 and 1"):
        encode_onehot(np.full((1, 1, 3), 2, dtype=np.uint8))
    with pytest.raises(SourceError, match="3 channels"):
        encode_onehot(np.zeros((2, 2, 4), dtype=np.uint8))


def test_classes_and_regions():
    label_map = np.array([0, 1, 2, 3])
    assert to_classes(label_map).astype(int).tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    # WT = 1|2|3, TC = 1|3, ET = 3
    assert to_regions(label_map).astype(int).tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]
    assert expand(label_map, "regions").shape == (3, 4)
    with pytest.raises(ValueError, match="target"):
        expand(label_map, "labels")


def test_class_voxels_counts_every_label():
    assert class_voxels(np.array([[0, 0, 3], [3, 3, 1]])) == [2, 1, 0, 3]
