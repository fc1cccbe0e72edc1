import copy
import json

import pytest
from hypothesis import given, settings, strategies as st

from shards_spec.errors import SpecError
from shards_spec.manifest import SPEC_VERSION, content_digest, parse, to_bytes, validate_content

SHA = "0" * 64


def _content():
    return {
        "spec_version": SPEC_VERSION,
        "format": "webdataset",
        "channels": ["t1", "t1ce", "t2", "flair"],
        "labels": {"0": "background", "1": "NEC/NET", "2": "ED", "3": "ET"},
        "preprocessing": {"size": 16, "norm": "slice", "keep_empty": False},
        "source": {"layout": "brats2020"},
        "split": {"method": "ratios", "ratios": {"train": 1.0}, "seed": 0},
        "splits": {"train": {"patients": ["p1"], "records": 1, "slices": 3}},
        "shards": [{"path": "train/train-000000.tar", "split": "train", "patients": ["p1"], "records": 1,
                    "slices": 3, "bytes": 10, "files": [{"path": "train/train-000000.tar", "bytes": 10, "sha256": SHA}]}],
        "patients": {"p1": {"split": "train", "shard": "train/train-000000.tar", "key": "p1", "slices": 3,
                            "tumour_slices": 1, "class_voxels": [180, 1, 10, 1], "source_shape": [8, 8, 4],
                            "spacing": [1, 1, 1],
                            "affine": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}},
        "skipped": [],
    }


def test_valid_manifest_round_trips():
    data = to_bytes(_content(), {"command": "etl build-shards"})
    manifest = parse(data)
    assert manifest.channels == ["t1", "t1ce", "t2", "flair"] and manifest.size == 16
    assert manifest.patients_of("train") == ["p1"]
    assert manifest.digest == content_digest(_content())
    assert len(manifest.digest) == 64


def test_digest_ignores_key_order_but_not_values():
    content = _content()
    reordered = json.loads(json.dumps(content, sort_keys=False))
    reordered = dict(reversed(list(reordered.items())))
    assert content_digest(reordered) == content_digest(content)
    content["preprocessing"]["size"] = 32
    assert content_digest(content) != content_digest(_content())


def _mutate(path, value):
    content = _content()
    target = content
    for part in path[:-1]:
        target = target[part]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return content


@pytest.mark.parametrize("path, value, named", [
    (("spec_version",), "brats-slices/2", "content.spec_version"),
    (("format",), "parquet", "content.format"),
    (("channels",), ["t1", "dwi"], "content.channels"),
    (("preprocessing", "size"), "128", "content.preprocessing.size"),
    (("preprocessing", "norm"), KeyError, "content.preprocessing.norm"),
    (("shards", 0, "records"), True, "content.shards[0].records"),
    (("shards", 0, "files", 0, "sha256"), "abc", "content.shards[0].files[0].sha256"),
    (("shards", 0, "files", 0, "path"), "../../etc/passwd", "content.shards[0].files[0].path"),
    (("shards", 0, "path"), "/abs.tar", "content.shards[0].path"),
    (("patients", "p1", "shard"), "train/other.tar", "content.patients['p1'].shard"),
    (("patients", "p1", "key"), "p.1", "content.patients['p1'].key"),
    (("patients", "p1", "tumour_slices"), 9, "content.patients['p1'].tumour_slices"),
    (("splits", "train", "patients"), ["p9"], "content.splits['train'].patients"),
    (("skipped",), KeyError, "content.skipped"),
])
def test_validation_errors_name_the_field(path, value, named):
    with pytest.raises(SpecError) as info:
        validate_content(_mutate(path, value))
    assert named in str(info.value)


def test_parse_names_the_file_and_refuses_garbage():
    with pytest.raises(SpecError, match="shards/manifest.json: is not valid JSON"):
        parse(b"{not json", name="shards/manifest.json")
    with pytest.raises(SpecError, match="content.spec_version"):
        parse(to_bytes(_mutate(("spec_version",), "x"), {}), name="m.json")
    with pytest.raises(SpecError, match="provenance"):
        parse(json.dumps({"content": _content(), "provenance": []}).encode())


def test_unknown_split_is_a_clear_error():
    manifest = parse(to_bytes(_content(), {}))
    with pytest.raises(SpecError, match="split 'val' is not in this dataset"):
        manifest.shards_of("val")


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=500))
def test_fuzz_manifest_parser_bytes(data):
    try:
        parse(data)
    except SpecError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=20,
)


@settings(deadline=None, max_examples=300)
@given(st.sampled_from(["spec_version", "format", "channels", "preprocessing", "shards", "patients", "splits", "skipped"]), json_values)
def test_fuzz_manifest_fields(field, value):
    content = copy.deepcopy(_content())
    content[field] = value
    try:
        validate_content(content)
    except SpecError:
        pass
