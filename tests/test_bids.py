"""Tests of BIDS input discovery and BIDS-Derivatives naming and writing (bids_app.bids)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_app import bids as B
from bids_app.errors import DatasetError


# --------------------------------------------------------------------------- helpers
def _image(path: Path, voxel: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    nb.save(nb.Nifti1Image(data, np.diag([voxel, voxel, voxel, 1.0])), str(path))
    return path


def _dataset(root: Path, files: dict[str, float]) -> Path:
    """A tiny BIDS dataset: ``files`` maps relative paths to voxel sizes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    for rel, voxel in files.items():
        _image(root / rel, voxel)
    return root


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return _dataset(tmp_path / "raw", {
        "sub-01/anat/sub-01_T1w.nii.gz": 1.0,
        "sub-01/anat/sub-01_T2w.nii.gz": 1.0,
        "sub-01/anat/sub-01_FLAIR.nii.gz": 1.0,
        "sub-02/ses-A/anat/sub-02_ses-A_acq-mprage_run-1_T1w.nii.gz": 1.0,
        "sub-02/ses-A/anat/sub-02_ses-A_acq-mprage_run-2_T1w.nii.gz": 1.0,
        "sub-02/ses-A/anat/sub-02_ses-A_acq-fast_T1w.nii.gz": 1.2,
        "sub-02/ses-A/anat/sub-02_ses-A_acq-hires_T1w.nii.gz": 0.8,
        "sub-02/ses-B/anat/sub-02_ses-B_T2w.nii.gz": 1.0,
        "sub-03/anat/sub-03_T2w.nii.gz": 1.0,
        # never inputs: derivatives and hidden folders
        "derivatives/other/sub-01/anat/sub-01_desc-x_T1w.nii.gz": 1.0,
    })


@pytest.fixture()
def layout(dataset):
    return B.load_layout(dataset)


def _by_key(inputs):
    return {(a.subject, a.session): a for a in inputs}


# --------------------------------------------------------------------------- check_bids_root
def test_check_bids_root_missing_dir(tmp_path):
    path = tmp_path / "nothing"
    with pytest.raises(DatasetError, match="does not exist") as exc:
        B.check_bids_root(path)
    assert str(path) in str(exc.value)


def test_check_bids_root_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(DatasetError, match="not a directory") as exc:
        B.check_bids_root(path)
    assert str(path) in str(exc.value)


def test_check_bids_root_no_description(tmp_path):
    (tmp_path / "sub-01").mkdir()
    with pytest.raises(DatasetError, match="dataset_description.json is missing") as exc:
        B.check_bids_root(tmp_path)
    assert str(tmp_path) in str(exc.value)


def test_check_bids_root_invalid_json(tmp_path):
    (tmp_path / "sub-01").mkdir()
    (tmp_path / "dataset_description.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not readable JSON") as exc:
        B.check_bids_root(tmp_path)
    assert str(tmp_path / "dataset_description.json") in str(exc.value)


def test_check_bids_root_no_subjects(tmp_path):
    (tmp_path / "dataset_description.json").write_text("{}")
    (tmp_path / "sub-01.txt").write_text("a file, not a folder")
    with pytest.raises(DatasetError, match="no sub-") as exc:
        B.check_bids_root(tmp_path)
    assert str(tmp_path) in str(exc.value)


def test_check_bids_root_ok(dataset):
    assert B.check_bids_root(dataset) is None


# --------------------------------------------------------------------------- layout and selection
def test_load_layout(layout, dataset):
    assert Path(layout.root) == dataset
    assert sorted(layout.get_subjects()) == ["01", "02", "03"]
    assert sorted(layout.get_sessions()) == ["A", "B"]
    files = layout.get(return_type="file")
    assert not any("derivatives" in f for f in files)
    # nothing was written into the dataset
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset_description.json", "derivatives", "sub-01",
                                                          "sub-02", "sub-03"]


def test_load_layout_errors_are_dataset_errors(tmp_path):
    with pytest.raises(DatasetError):
        B.load_layout(tmp_path / "missing")


def test_collect_all(layout, dataset):
    found = _by_key(B.collect_anatomical(layout))
    assert set(found) == {("01", None), ("02", "A"), ("02", "B"), ("03", None)}
    one = found[("01", None)]
    assert one.t1w == dataset / "sub-01/anat/sub-01_T1w.nii.gz"
    assert one.t2w == dataset / "sub-01/anat/sub-01_T2w.nii.gz"
    assert one.flair == dataset / "sub-01/anat/sub-01_FLAIR.nii.gz"
    assert one.notes == ()
    assert one.label == "sub-01" and one.workflow_name == "sub_01_wf"
    # subject/session without T1w
    assert found[("03", None)].t1w is None
    assert found[("03", None)].t2w == dataset / "sub-03/anat/sub-03_T2w.nii.gz"
    assert found[("02", "B")].t1w is None
    assert found[("02", "B")].label == "sub-02_ses-B"
    assert found[("02", "B")].workflow_name == "sub_02_ses_B_wf"


def test_finest_voxel_then_highest_run(layout, dataset):
    chosen = _by_key(B.collect_anatomical(layout, participant_label=["02"], session_label=["A"]))[("02", "A")]
    assert chosen.t1w.name == "sub-02_ses-A_acq-hires_T1w.nii.gz"  # 0.8 mm beats 1 mm
    assert len(chosen.notes) == 1
    note = chosen.notes[0]
    assert "4 T1w images" in note and "sub-02_ses-A_acq-hires_T1w.nii.gz" in note
    for other in ("acq-mprage_run-1", "acq-mprage_run-2", "acq-fast"):
        assert other in note
    # among equal voxel sizes the highest run wins
    (dataset / "sub-02/ses-A/anat/sub-02_ses-A_acq-hires_T1w.nii.gz").unlink()
    (dataset / "sub-02/ses-A/anat/sub-02_ses-A_acq-fast_T1w.nii.gz").unlink()
    chosen = B.collect_anatomical(B.load_layout(dataset), participant_label=["02"], session_label=["A"])[0]
    assert chosen.t1w.name == "sub-02_ses-A_acq-mprage_run-2_T1w.nii.gz"
    assert "run-1" in chosen.notes[0] and "highest run" in chosen.notes[0]


@pytest.mark.parametrize("labels", [["02"], ["sub-02"], ["sub-02,sub-02"], ["02", "sub-02"]])
def test_participant_labels_with_and_without_prefix(layout, labels):
    found = B.collect_anatomical(layout, participant_label=labels)
    assert {a.subject for a in found} == {"02"}
    assert sorted(a.session for a in found) == ["A", "B"]


def test_comma_separated_labels(layout):
    found = B.collect_anatomical(layout, participant_label=["sub-01,03"])
    assert [a.subject for a in found] == ["01", "03"]


@pytest.mark.parametrize("sessions", [["A"], ["ses-A"], ["ses-A,A"]])
def test_session_labels(layout, sessions):
    found = B.collect_anatomical(layout, participant_label=["02"], session_label=sessions)
    assert [(a.subject, a.session) for a in found] == [("02", "A")]
    found = B.collect_anatomical(layout, participant_label=["02"], session_label=["ses-A,ses-B"])
    assert sorted(a.session for a in found) == ["A", "B"]


def test_unknown_participant(layout):
    with pytest.raises(DatasetError) as exc:
        B.collect_anatomical(layout, participant_label=["sub-01", "sub-99", "42"])
    msg = str(exc.value)
    assert "sub-99" in msg and "sub-42" in msg and "sub-01," not in msg
    assert "available: 01, 02, 03" in msg
    assert str(layout.root) in msg


def test_unknown_session(layout):
    with pytest.raises(DatasetError) as exc:
        B.collect_anatomical(layout, participant_label=["02"], session_label=["ses-C"])
    msg = str(exc.value)
    assert "ses-C" in msg and "available: A, B" in msg


def test_bids_filters(layout):
    found = B.collect_anatomical(layout, participant_label=["02"], session_label=["A"],
                                 bids_filters={"t1w": {"acquisition": "mprage"}})
    chosen = found[0]
    assert chosen.t1w.name == "sub-02_ses-A_acq-mprage_run-2_T1w.nii.gz"
    assert "2 T1w images" in chosen.notes[0]
    found = B.collect_anatomical(layout, participant_label=["02"], session_label=["A"],
                                 bids_filters={"t1w": {"acquisition": "fast"}})
    assert found[0].t1w.name == "sub-02_ses-A_acq-fast_T1w.nii.gz" and found[0].notes == ()
    # a filter on one suffix leaves the others alone
    found = _by_key(B.collect_anatomical(layout, participant_label=["01"], bids_filters={"t2w": {"acquisition": "x"}}))
    assert found[("01", None)].t2w is None and found[("01", None)].t1w is not None


# --------------------------------------------------------------------------- filters and labels
def test_load_bids_filters(tmp_path):
    assert B.load_bids_filters(None) == {}
    good = tmp_path / "f.json"
    good.write_text(json.dumps({"t1w": {"acquisition": "mprage"}, "flair": {}}))
    assert B.load_bids_filters(good) == {"t1w": {"acquisition": "mprage"}, "flair": {}}


@pytest.mark.parametrize(
    "content, words",
    [
        ("{bad json", ["not valid JSON", "line 1"]),
        (json.dumps({"bold": {"task": "rest"}}), ["unknown keys", "bold"]),
        (json.dumps([{"t1w": {}}]), ["JSON object"]),
        (json.dumps({"t1w": "mprage"}), ["'t1w'", "JSON object"]),
    ],
)
def test_load_bids_filters_errors(tmp_path, content, words):
    path = tmp_path / "filters.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as exc:
        B.load_bids_filters(path)
    assert str(path) in str(exc.value)
    for word in words:
        assert word in str(exc.value)


def test_load_bids_filters_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="cannot read"):
        B.load_bids_filters(tmp_path / "none.json")


def test_strip_prefix():
    assert B.strip_prefix(["sub-01", "02", "sub-03,04", " sub-05 ", "01", ""], "sub-") == ("01", "02", "03", "04", "05")
    assert B.strip_prefix(None, "sub-") == ()
    assert B.strip_prefix(["ses-A,ses-B"], "ses-") == ("A", "B")
    assert B.strip_prefix(["sub-sub-1"], "sub-") == ("sub-1",)  # only one prefix is removed


# --------------------------------------------------------------------------- derivative names
@pytest.mark.parametrize(
    "entities, expected",
    [
        ({"subject": "01", "desc": "preproc", "suffix": "T1w", "extension": ".nii.gz"},
         "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"),
        ({"subject": "01", "session": "A", "run": 2, "desc": "preproc", "suffix": "T1w", "extension": ".nii.gz"},
         "sub-01/ses-A/anat/sub-01_ses-A_run-2_desc-preproc_T1w.nii.gz"),
        ({"subject": "01", "desc": "preproc", "suffix": "T1w"}, "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"),
        ({"subject": "01", "session": "A", "label": "ICV", "suffix": "mask", "extension": ".nii.gz"},
         "sub-01/ses-A/anat/sub-01_ses-A_label-ICV_mask.nii.gz"),
        ({"subject": "01", "desc": "brain", "suffix": "mask", "extension": ".json"},
         "sub-01/anat/sub-01_desc-brain_mask.json"),
        ({"subject": "01", "session": "A", "acquisition": "mprage", "run": 1, "from": "T1w", "to": "MNI152NLin6Asym",
          "mode": "image", "suffix": "xfm", "extension": ".mat"},
         "sub-01/ses-A/anat/sub-01_ses-A_acq-mprage_run-1_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.mat"),
        ({"subject": "01", "from": "MNI152NLin6Asym", "to": "T1w", "mode": "image", "suffix": "xfm"},
         "sub-01/anat/sub-01_from-MNI152NLin6Asym_to-T1w_mode-image_xfm.mat"),
        ({"subject": "01", "run": 3, "space": "MNI152NLin6Asym", "desc": "cerebellum", "suffix": "T1w",
          "extension": ".nii.gz"},
         "sub-01/anat/sub-01_run-3_space-MNI152NLin6Asym_desc-cerebellum_T1w.nii.gz"),
        ({"subject": "01", "session": "A", "run": 1, "datatype": "figures", "desc": "conform", "suffix": "T1w",
          "extension": ".svg"},
         "sub-01/figures/sub-01_ses-A_run-1_desc-conform_T1w.svg"),
        ({"subject": "01", "datatype": "figures", "desc": "brain", "suffix": "mask", "extension": ".svg"},
         "sub-01/figures/sub-01_desc-brain_mask.svg"),
        ({"subject": "01", "datatype": "figures", "space": "MNI152NLin6Asym", "suffix": "T1w"},
         "sub-01/figures/sub-01_space-MNI152NLin6Asym_T1w.svg"),
    ],
)
def test_derivative_path(entities, expected):
    assert B.derivative_path(entities) == expected


@pytest.mark.parametrize(
    "entities",
    [
        {"subject": "01", "suffix": "bold", "extension": ".nii.gz"},  # not an ArborSeg output
        {"subject": "01", "desc": "preproc", "suffix": "T1w", "extension": ".svg"},  # figures need datatype
        {"desc": "preproc", "suffix": "T1w", "extension": ".nii.gz"},  # no subject
    ],
)
def test_derivative_path_no_match(entities):
    with pytest.raises(ValueError, match="no ArborSeg derivative pattern"):
        B.derivative_path(entities)


def test_source_entities_and_raw_uri(dataset):
    src = dataset / "sub-02/ses-A/anat/sub-02_ses-A_acq-mprage_run-2_T1w.nii.gz"
    ents = B.source_entities(src)
    assert ents == {"subject": "02", "session": "A", "acquisition": "mprage", "run": 2}
    assert B.raw_uri(src, dataset) == "bids:raw:sub-02/ses-A/anat/sub-02_ses-A_acq-mprage_run-2_T1w.nii.gz"
    outside = dataset.parent / "elsewhere.nii.gz"
    assert B.raw_uri(outside, dataset) == outside.resolve().as_uri()


# --------------------------------------------------------------------------- atomic writes
def _temp_leftovers(folder: Path):
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".part"))


def test_atomic_writes(tmp_path):
    out = tmp_path / "a" / "b"
    p1 = B.atomic_write_bytes(out / "x.bin", b"\x00\x01binary")
    p2 = B.atomic_write_text(out / "x.txt", "héllo\n")
    p3 = B.atomic_write_json(out / "x.json", {"b": 1, "a": [1, 2], "path": Path("/p")})
    assert p1.read_bytes() == b"\x00\x01binary"
    assert p2.read_text(encoding="utf-8") == "héllo\n"
    assert json.loads(p3.read_text()) == {"a": [1, 2], "b": 1, "path": "/p"}
    assert p3.read_text().endswith("\n")
    # overwrite replaces the whole content
    B.atomic_write_text(out / "x.txt", "short")
    assert p2.read_text() == "short"
    src = tmp_path / "src.dat"
    src.write_bytes(b"copy me" * 1000)
    p4 = B.atomic_copy(src, out / "c" / "copy.dat")
    assert p4.read_bytes() == src.read_bytes()
    assert _temp_leftovers(tmp_path) == []
    # files are readable like any normally created file (umask honoured, not mkstemp's 0600)
    umask = os.umask(0)
    os.umask(umask)
    for p in (p1, p2, p3, p4):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_failure_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    B.atomic_write_json(target, {"old": True})

    def boom(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        B.atomic_write_json(target, {"new": True})
    with pytest.raises(OSError):
        B.atomic_copy(target, tmp_path / "copy.json")
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert not (tmp_path / "copy.json").exists()
    assert _temp_leftovers(tmp_path) == []


def test_write_dataset_description(tmp_path, monkeypatch):
    monkeypatch.delenv("ARBORSEG_CONTAINER", raising=False)
    raw = tmp_path / "raw"
    path = B.write_dataset_description(tmp_path / "out", bids_dir=raw, version="1.2.3")
    assert path == tmp_path / "out" / "dataset_description.json"
    desc = json.loads(path.read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["BIDSVersion"]
    assert isinstance(desc["GeneratedBy"], list) and desc["GeneratedBy"][0]["Name"] == "ArborSeg"
    assert desc["GeneratedBy"][0]["Version"] == "1.2.3"
    assert "Container" not in desc["GeneratedBy"][0]
    assert desc["DatasetLinks"]["raw"] == raw.resolve().as_uri()
    monkeypatch.setenv("ARBORSEG_CONTAINER", "1")
    desc = json.loads(B.write_dataset_description(tmp_path / "out", bids_dir=raw, version="1.2.3").read_text())
    assert desc["GeneratedBy"][0]["Container"] == {"Type": "docker", "Tag": "arborseg/arborseg:1.2.3"}
    assert _temp_leftovers(tmp_path) == []


# --------------------------------------------------------------------------- pybids reads what we write
DERIVATIVES = [
    {"desc": "preproc", "suffix": "T1w", "extension": ".nii.gz"},
    {"desc": "preproc", "suffix": "T1w", "extension": ".json"},
    {"label": "ICV", "suffix": "mask", "extension": ".nii.gz"},
    {"label": "ICV", "suffix": "mask", "extension": ".json"},
    {"desc": "brain", "suffix": "mask", "extension": ".nii.gz"},
    {"desc": "brain", "suffix": "mask", "extension": ".json"},
    {"from": "T1w", "to": "MNI152NLin6Asym", "mode": "image", "suffix": "xfm", "extension": ".mat"},
    {"from": "T1w", "to": "MNI152NLin6Asym", "mode": "image", "suffix": "xfm", "extension": ".json"},
    {"from": "MNI152NLin6Asym", "to": "T1w", "mode": "image", "suffix": "xfm", "extension": ".mat"},
    {"space": "MNI152NLin6Asym", "desc": "preproc", "suffix": "T1w", "extension": ".nii.gz"},
    {"space": "MNI152NLin6Asym", "desc": "cerebellum", "suffix": "T1w", "extension": ".nii.gz"},
    {"space": "MNI152NLin6Asym", "desc": "cerebellum", "suffix": "T1w", "extension": ".json"},
    {"datatype": "figures", "desc": "conform", "suffix": "T1w", "extension": ".svg"},
    {"datatype": "figures", "desc": "brain", "suffix": "mask", "extension": ".svg"},
    {"datatype": "figures", "space": "MNI152NLin6Asym", "suffix": "T1w", "extension": ".svg"},
]
SOURCES = [
    {"subject": "01"},
    {"subject": "02", "session": "A", "acquisition": "mprage", "run": 2},
]


def test_pybids_indexes_every_derivative(tmp_path, dataset):
    from bids import BIDSLayout

    root = tmp_path / "derivatives" / "arborseg"
    B.write_dataset_description(root, bids_dir=dataset, version="0.0.1")
    written: dict[str, dict] = {}
    for source in SOURCES:
        for extra in DERIVATIVES:
            ents = {**source, **extra}
            path = root / B.derivative_path(ents)
            if ents["extension"] == ".json":
                B.atomic_write_json(path, {"Sources": ["bids:raw:x"]})
            elif ents["extension"] == ".nii.gz":
                _image(path)
            else:
                B.atomic_write_text(path, "payload")
            written[str(path)] = ents
    assert len(written) == len(SOURCES) * len(DERIVATIVES)  # all names are distinct

    layout = BIDSLayout(str(root), validate=False, config=["bids", "derivatives"], is_derivative=True)
    indexed = {f.path: f for f in layout.get()}
    assert set(indexed) - set(written) == {str(root / "dataset_description.json")}
    assert set(written) <= set(indexed)
    # and the entities read back are the ones the names were built from
    for path, ents in written.items():
        got = indexed[path].get_entities()
        for key, value in ents.items():
            if key == "datatype":  # 'figures' is not a BIDS datatype pybids knows
                continue
            assert got.get(key) == value, (path, key)

    # also as the derivatives of the raw dataset
    combined = BIDSLayout(str(dataset), validate=False, derivatives=str(root))
    in_derivatives = set(combined.get(scope="derivatives", return_type="file"))
    assert set(written) <= in_derivatives
    assert combined.get(scope="derivatives", subject="02", session="A", label="ICV", suffix="mask",
                        extension=".nii.gz", return_type="file") == [
        str(root / "sub-02/ses-A/anat/sub-02_ses-A_acq-mprage_run-2_label-ICV_mask.nii.gz")]
