"""``arborseg-train calibrate-qc``: thresholds from a cross-validation QC study into the members' manifests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bids_app.core.labels import load_protocol
from bids_app.training.cli import main
from bids_app.training.crossval import calibrate_qc
from tests.conftest import tiny_wholebrain_checkpoint


def _study(folder, mean_cvs, conditions, mc_samples=15, tta=None):
    rng = np.random.default_rng(0)
    qc = []
    for i, (mcv, condition) in enumerate(zip(mean_cvs, conditions)):
        structure_cv = {}
        for name in ("aseg", "cerebrum7", "deep14"):
            cv = (mcv + rng.normal(0, 0.5, len(load_protocol(name)))).tolist()
            cv[0] = 0.1  # background: excluded from the thresholds
            cv[-1] = float("nan") if i % 2 else cv[-1]  # a structure absent from some scans
            structure_cv[name] = {"mean_cv_percent": mcv, "cv_percent": cv}
        qc.append({"subject": f"s{i}", "fold": 0, "condition": condition, "mean_cv_percent": mcv,
                   "aseg_mean_dice": 0.8 - 0.02 * (mcv - 6), "qc_flag": "warn", "structure_cv": structure_cv})
    folder.mkdir(parents=True)
    raw = {"qc": qc, "mc_samples": mc_samples}
    if tta is not None:
        raw["tta"] = tta
    (folder / "cv_raw.json").write_text(json.dumps(raw))
    return folder


def test_calibrate_qc_thresholds_and_study(tmp_path):
    part = _study(tmp_path / "cv", [6.0, 7.0, 8.0, 7.0, 8.5, 10.0], ["clean"] * 4 + ["blur", "bias"])
    cal = calibrate_qc([part], ["m2", "m1"])
    assert cal["ensemble"] == ["m1", "m2"] and cal["mc_samples"] == 15 and cal["modality"] == "T1w"
    assert set(cal["protocols"]) == {"aseg", "cerebrum7", "deep14"}
    expected = 7.0 + 2 * np.std([6.0, 7.0, 8.0, 7.0], ddof=1)
    assert cal["protocols"]["aseg"]["mean_cv_threshold_percent"] == pytest.approx(expected, abs=1e-4)
    aseg = load_protocol("aseg")
    per = cal["protocols"]["aseg"]["structure_thresholds_percent"]
    assert "background" not in per and aseg.names[1] in per
    assert aseg.names[-1] not in per  # present in only 2 clean scans: no threshold of its own
    study = cal["study"]
    assert study["clean_scans"] == 4 and study["clean_flagged"] == 0
    assert study["degraded_scans"] == 2 and study["degraded_flagged"] == 1  # 8.5 passes (limit 8.63), 10.0 is flagged
    assert study["pearson_r_cv_vs_dice"] == pytest.approx(-1.0)


def test_calibrate_qc_refuses_old_or_mixed_studies(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "cv_raw.json").write_text(json.dumps({"qc": [{"condition": "clean", "mean_cv_percent": 1.0,
                                                          "aseg_mean_dice": 0.8}], "mc_samples": 15}))
    with pytest.raises(ValueError, match="per-structure CVs"):
        calibrate_qc([old], ["m"])
    a = _study(tmp_path / "a", [6.0, 7.0, 8.0], ["clean"] * 3, mc_samples=15)
    b = _study(tmp_path / "b", [6.0, 7.0, 8.0], ["clean"] * 3, mc_samples=5)
    with pytest.raises(ValueError, match="MC sample counts"):
        calibrate_qc([a, b], ["m"])


def test_cli_writes_the_calibration_that_segmentation_then_uses(tmp_path, capsys):
    from bids_app.models.segment import segment_volume

    part = _study(tmp_path / "cv", [6.0, 7.0, 8.0, 7.0], ["clean"] * 4, mc_samples=2)
    m1 = tiny_wholebrain_checkpoint(tmp_path / "m1", seed=1)
    m2 = tiny_wholebrain_checkpoint(tmp_path / "m2", seed=2)
    assert main(["calibrate-qc", str(part), "--models", str(m1), str(m2)]) == 0
    assert "aseg: mean CV threshold" in capsys.readouterr().out
    for path in (m1, m2):
        assert json.loads(path.read_text())["qc_calibration"]["ensemble"] == ["m1", "m2"]
    image = np.zeros((12, 12, 12), dtype=np.float32)
    image[2:10, 2:10, 2:10] = 1.0
    both = segment_volume(image, [m2, m1], mc_samples=2, device="cpu", num_threads=1)
    assert both.qc_calibration is not None
    assert both.qc_threshold == pytest.approx(7.0 + 2 * np.std([6.0, 7.0, 8.0, 7.0], ddof=1), abs=1e-4)
    alone = segment_volume(image, [m1], mc_samples=2, device="cpu", num_threads=1)
    assert alone.qc_calibration is None and alone.qc_threshold == 1.0  # not the calibrated ensemble
    # a manifest that is not there is an error naming it, and nothing is written
    assert main(["calibrate-qc", str(part), "--models", str(tmp_path / "nope.json")]) != 0


def test_calibrate_qc_keeps_one_method_of_a_cerebellum_study(tmp_path):
    lobules = load_protocol("lobules")
    qc = []
    for i, (method, mcv) in enumerate([("population", 2.0), ("population", 2.2), ("population", 1.8),
                                       ("other", 9.0), ("other", 9.5), ("other", 9.9)]):
        cv = [0.0] + [mcv] * (len(lobules) - 1)
        qc.append({"subject": f"s{i % 3}", "method": method, "condition": "clean", "mean_cv_percent": mcv,
                   "dice": 0.7, "structure_cv": {"lobules": {"mean_cv_percent": mcv, "cv_percent": cv}}})
    (tmp_path / "cv_raw.json").write_text(json.dumps({"qc": qc, "mc_samples": 15}))
    cal = calibrate_qc([tmp_path], ["h", "l"], method="population")
    assert cal["study_method"] == "population" and cal["study"]["dice"] == "lobule mean Dice"
    assert cal["protocols"]["lobules"]["mean_cv_threshold_percent"] == pytest.approx(2.0 + 2 * 0.2, abs=1e-4)
    with pytest.raises(ValueError, match="no QC-study rows of method 'nope'"):
        calibrate_qc([tmp_path], ["h", "l"], method="nope")


def test_calibrate_qc_keeps_the_rows_of_the_ensembles_folds(tmp_path):
    part = _study(tmp_path / "cv", [6.0, 7.0, 8.0, 12.0, 13.0, 14.0], ["clean"] * 6)
    raw = json.loads((part / "cv_raw.json").read_text())
    for q in raw["qc"][3:]:
        q["fold"] = 1  # another fold's pair, much less certain
    (part / "cv_raw.json").write_text(json.dumps(raw))
    fold0 = calibrate_qc([part], ["m"], folds=[0])
    assert fold0["study"]["clean_scans"] == 3 and fold0["study"]["subjects"] == ["s0", "s1", "s2"]
    assert fold0["protocols"]["aseg"]["mean_cv_threshold_percent"] == pytest.approx(7.0 + 2 * 1.0, abs=1e-4)
    assert calibrate_qc([part], ["m"])["study"]["clean_scans"] == 6
    with pytest.raises(ValueError, match=r"no QC-study rows of fold\(s\) \[2\]"):
        calibrate_qc([part], ["m"], folds=[2])


def test_calibration_records_the_test_time_augmentation_of_the_study(tmp_path):
    plain = _study(tmp_path / "plain", [6.0, 7.0, 8.0], ["clean"] * 3)  # a study of an older version: none
    views = _study(tmp_path / "views", [6.0, 7.0, 8.0], ["clean"] * 3, tta="flip-shift")
    assert calibrate_qc([plain], ["m"])["tta"] == "none"
    assert calibrate_qc([views], ["m"])["tta"] == "flip-shift"
    with pytest.raises(ValueError, match="test-time augmentations"):
        calibrate_qc([plain, views], ["m"])


def test_cv_merge_keeps_only_the_methods_asked_for(tmp_path):
    from bids_app.training.crossval import merge_cv

    def row(subject, method, dice):
        return {"subject": subject, "label": 10, "name": "Left-Thalamus", "dice": dice, "hd95_mm": 2.0,
                "assd_mm": 0.5, "volumetric_similarity": 0.95, "f2": dice, "balanced_accuracy": 0.9,
                "volume_pred_mm3": 8000.0, "volume_ref_mm3": 7900.0, "method": method, "protocol": "deep14"}

    split = [["s1"], ["s2"], ["s3"]]
    parts = []
    for k, (subject, methods) in enumerate([("s1", ["ensemble", "jlf"]), ("s2", ["jlf"]), ("s3", ["ensemble"])]):
        part = tmp_path / f"part{k}"
        part.mkdir()
        raw = {"rows": [row(subject, m, 0.8 if m == "jlf" else 0.9) for m in methods], "qc": [],
               "timing": {m: [100.0 if m == "jlf" else 10.0] for m in methods}, "archs": ["unet"], "mc_samples": 15,
               "split": split, "folds": [k], "tta": "flip-shift"}
        (part / "cv_raw.json").write_text(json.dumps(raw))
        parts.append(part)
    summary = merge_cv(parts, tmp_path / "jlf", methods=["jlf"])
    assert list(summary["methods"]) == ["jlf"]
    assert summary["methods"]["jlf"]["deep14"]["overall"]["dice_mean"] == pytest.approx(0.8)
    assert summary["seconds_per_subject"] == {"jlf": 100.0}
    raw = json.loads((tmp_path / "jlf" / "cv_raw.json").read_text())
    assert raw["folds"] == [0, 1] and {r["subject"] for r in raw["rows"]} == {"s1", "s2"}
    everything = merge_cv(parts, tmp_path / "all")
    assert set(everything["methods"]) == {"ensemble", "jlf"}
