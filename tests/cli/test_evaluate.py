"""``arborseg-evaluate``: tiny label NIfTI pairs made here, TSV/JSON content and error paths."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from bids_app.core.labels import load_protocol
from bids_app.core.metrics import concordance_correlation
from bids_app.errors import EXIT_INPUT, EXIT_USAGE
from bids_app.evaluate import TSV_COLUMNS, evaluate_arrays, evaluate_pairs, main, summarise_rows
from tests.conftest import write_nifti

AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])


def _labels(shift=0, seed=0):
    """12^3 aseg image: left WM (2), left cortex (3), a ventricle (4) and right WM (41)."""
    img = np.zeros((12, 12, 12), dtype=np.int16)
    img[2:6, 2:10, 2:10] = 3
    img[3:5, 3:9, 3:9] = 2
    img[7:11, 2:10, 2:10] = 41
    img[4, 5:7, 5 + shift:7 + shift] = 4
    if seed:
        rng = np.random.default_rng(seed)
        img[rng.random(img.shape) < 0.03] = 0
    return img


def _read_tsv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _run(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _errors(err):
    return [ln for ln in err.splitlines() if "| ERROR" in ln]


@pytest.fixture
def three_pairs(tmp_path):
    preds, refs = [], []
    for k in range(3):
        refs.append(write_nifti(tmp_path / "ref" / f"sub-0{k}_dseg.nii.gz", _labels(), AFFINE))
        preds.append(write_nifti(tmp_path / "pred" / f"sub-0{k}_desc-arborseg_dseg.nii.gz",
                                 _labels(shift=k, seed=k), AFFINE))
    return preds, refs


def test_evaluate_writes_tsv_and_json(tmp_path, capsys, three_pairs):
    preds, refs = three_pairs
    out_tsv, out_json = tmp_path / "out" / "metrics.tsv", tmp_path / "out" / "summary.json"
    code, err = _run(["--pred", *preds, "--ref", *refs, "--protocol", "aseg",
                      "--out-tsv", out_tsv, "--out-json", out_json], capsys)
    assert code == 0, err
    aseg = load_protocol("aseg")
    rows = _read_tsv(out_tsv)
    assert tuple(rows[0]) == TSV_COLUMNS
    assert len(rows) == 3 * (len(aseg) - 1)  # background left out
    assert {r["subject"] for r in rows} == {"sub-00", "sub-01", "sub-02"}
    by = {(r["subject"], r["name"]): r for r in rows}
    perfect = by[("sub-00", "Left-Lateral-Ventricle")]
    assert float(perfect["dice"]) == 1.0 and float(perfect["hd95_mm"]) == 0.0
    assert float(perfect["volume_ref_mm3"]) == pytest.approx(4 * 1.5)
    shifted = by[("sub-02", "Left-Lateral-Ventricle")]  # 2 voxels moved by 2 along z: no overlap
    assert float(shifted["dice"]) == 0.0 and float(shifted["hd95_mm"]) == pytest.approx(3.0)
    absent = by[("sub-01", "Left-Thalamus")]
    assert absent["dice"] == "n/a" and absent["hd95_mm"] == "n/a" and float(absent["volume_pred_mm3"]) == 0
    assert not list(out_tsv.parent.glob(".*part*"))  # atomic writes leave nothing behind

    summary = json.loads(out_json.read_text())
    assert summary["protocol"] == "aseg" and summary["n_subjects"] == 3
    structures = {s["name"]: s for s in summary["structures"]}
    assert "background" not in structures
    vent = structures["Left-Lateral-Ventricle"]
    assert vent["dice"]["mean"] == pytest.approx(np.mean([1.0, 0.5, 0.0]))
    assert vent["dice"]["sd"] == pytest.approx(0.5)
    assert vent["dice"]["n"] == 3
    assert vent["volume_pearson"] is None  # the reference volume is the same in every subject
    assert structures["Left-Thalamus"]["dice"]["mean"] is None
    wm = structures["Left-Cerebral-White-Matter"]
    assert set(wm) >= {"hd95_mm", "assd_mm", "volumetric_similarity", "f2", "balanced_accuracy",
                       "volume_pred_mm3", "volume_ref_mm3", "volume_ccc", "volume_pearson"}
    wm_rows = [r for r in rows if r["name"] == "Left-Cerebral-White-Matter"]
    vp = [float(r["volume_pred_mm3"]) for r in wm_rows]
    vr = [float(r["volume_ref_mm3"]) for r in wm_rows]
    assert wm["volume_ccc"] == pytest.approx(concordance_correlation(vp, vr))
    assert wm["volume_ccc"] < 1
    cortex = [float(r["volume_pred_mm3"]) for r in rows if r["name"] == "Left-Cerebral-Cortex"]
    assert structures["Left-Cerebral-Cortex"]["volume_pred_mm3"]["mean"] == pytest.approx(np.mean(cortex))
    present = [s["dice"]["mean"] for s in summary["structures"] if s["dice"]["mean"] is not None]
    assert len(present) == 4
    assert summary["overall"]["dice_mean"] == pytest.approx(np.mean(present))
    per_subject = summary["overall"]["mean_dice_per_subject"]
    assert summary["overall"]["dice_sd_across_subjects"] == pytest.approx(np.std(list(per_subject.values()), ddof=1))
    assert "medpy" in summary["hd95_definition"]


def test_finer_prediction_and_mapped_reference(tmp_path, capsys):
    ref = _labels()
    ref_fs = ref.copy()
    ref_fs[3, 4, 4] = 77  # a FreeSurfer WM hypointensity inside left WM -> 2
    ref_fs[ref == 3] = 1002  # a cortical parcel -> left cortex
    pred = ref.copy()
    pred[ref == 3] = 1003  # dkt-aseg parcel -> left cortex
    p = write_nifti(tmp_path / "pred.nii.gz", pred, AFFINE)
    r = write_nifti(tmp_path / "aseg.nii.gz", ref_fs, AFFINE)
    out = tmp_path / "m.tsv"
    code, err = _run(["--pred", p, "--ref", r, "--protocol", "aseg", "--pred-protocol", "dkt-aseg",
                      "--ref-mapping", "freesurfer", "--subjects", "s1", "--out-tsv", out], capsys)
    assert code == 0, err
    rows = {row["name"]: row for row in _read_tsv(out)}
    for name in ("Left-Cerebral-Cortex", "Left-Cerebral-White-Matter", "Right-Cerebral-White-Matter"):
        assert float(rows[name]["dice"]) == 1.0
    assert {row["subject"] for row in rows.values()} == {"s1"}


def test_shape_mismatch_is_one_line_and_exit_2(tmp_path, capsys):
    p = write_nifti(tmp_path / "pred.nii.gz", _labels(), AFFINE)
    r = write_nifti(tmp_path / "ref.nii.gz", _labels()[:, :, :10], AFFINE)
    out = tmp_path / "m.tsv"
    code, err = _run(["--pred", p, "--ref", r, "--protocol", "aseg", "--out-tsv", out], capsys)
    assert code == EXIT_USAGE == 2
    lines = _errors(err)
    assert len(lines) == 1
    assert str(p) in lines[0] and str(r) in lines[0] and "shape" in lines[0]
    assert not out.exists()


def test_affine_mismatch(tmp_path, capsys):
    p = write_nifti(tmp_path / "pred.nii.gz", _labels(), AFFINE)
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.01
    r = write_nifti(tmp_path / "ref.nii.gz", _labels(), shifted)
    code, err = _run(["--pred", p, "--ref", r, "--protocol", "aseg", "--out-json", tmp_path / "s.json"], capsys)
    assert code == 2
    assert len(_errors(err)) == 1 and "affine" in err and str(p) in err and str(r) in err
    # within the tolerance is fine
    shifted[0, 3] = 1e-4
    r2 = write_nifti(tmp_path / "ref2.nii.gz", _labels(), shifted)
    assert _run(["--pred", p, "--ref", r2, "--protocol", "aseg", "--out-json", tmp_path / "s.json"], capsys)[0] == 0


def test_reference_labels_outside_protocol(tmp_path, capsys):
    ref = _labels()
    ref[0, 0, 0] = 77
    p = write_nifti(tmp_path / "pred.nii.gz", _labels(), AFFINE)
    r = write_nifti(tmp_path / "ref.nii.gz", ref, AFFINE)
    code, err = _run(["--pred", p, "--ref", r, "--protocol", "aseg", "--out-tsv", tmp_path / "m.tsv"], capsys)
    assert code == EXIT_INPUT
    assert len(_errors(err)) == 1 and str(r) in err and "77" in err and "--ref-mapping" in err


def test_missing_file_and_unknown_mapping(tmp_path, capsys):
    p = write_nifti(tmp_path / "pred.nii.gz", _labels(), AFFINE)
    code, err = _run(["--pred", p, "--ref", tmp_path / "nope.nii.gz", "--protocol", "aseg",
                      "--out-tsv", tmp_path / "m.tsv"], capsys)
    assert code == EXIT_INPUT and "nope.nii.gz: no such file" in err
    code, err = _run(["--pred", p, "--ref", p, "--protocol", "aseg", "--ref-mapping", "nonsense",
                      "--out-tsv", tmp_path / "m.tsv"], capsys)
    assert code == EXIT_USAGE and len(_errors(err)) == 1 and "nonsense" in err


def test_unpaired_arguments(tmp_path, capsys):
    p = write_nifti(tmp_path / "pred.nii.gz", _labels(), AFFINE)
    with pytest.raises(SystemExit) as info:
        main(["--pred", str(p), str(p), "--ref", str(p), "--protocol", "aseg", "--out-tsv", str(tmp_path / "m")])
    assert info.value.code == 2
    assert "matched in pairs" in capsys.readouterr().err


def test_library_functions():
    aseg = load_protocol("aseg")
    ref = _labels()
    pred = ref.copy()
    pred[ref == 3] = 1005
    rows, summary = evaluate_pairs([("a", pred, ref, (1, 1, 1.5)), ("b", pred, ref, (1, 1, 1.5))], "aseg",
                                   pred_protocol="dkt-aseg")
    assert len(rows) == 2 * (len(aseg) - 1)
    assert summary["overall"]["dice_mean"] == 1.0
    assert summary["overall"]["dice_sd_across_subjects"] == 0.0
    assert all(s["volume_ccc"] is None for s in summary["structures"])  # fewer than 3 subjects
    direct = evaluate_arrays(ref, ref, aseg, (1, 1, 1.5), "c", include_background=True)
    assert direct[0]["label"] == 0 and direct[0]["dice"] == 1.0
    again = summarise_rows(direct, aseg)
    assert again["overall"]["n_structures"] == 4  # background not in the overall mean
    assert not math.isnan(again["structures"][0]["dice"]["mean"])
