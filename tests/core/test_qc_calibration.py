"""QC threshold calibration (bids_app.core.qc_calibration): limits, study figures, lookup."""

from __future__ import annotations

import numpy as np
import pytest

from bids_app.core.qc_calibration import (
    calibrate_protocol,
    find_calibration,
    protocol_thresholds,
    threshold_study,
    upper_limit,
)


def test_upper_limit_is_mean_plus_n_sd_or_the_largest_value():
    values = np.array([6.0, 7.0, 8.0])  # mean 7, sample SD 1
    assert upper_limit(values, n_sd=2.0) == pytest.approx(9.0)
    # with a small n_sd the largest clean value wins: no clean scan is ever flagged
    assert upper_limit(values, n_sd=0.5) == pytest.approx(8.0)
    # per column, NaN (structure absent) ignored; too few values give NaN
    table = np.array([[1.0, np.nan], [2.0, 5.0], [3.0, np.nan], [np.nan, 4.0]])
    out = upper_limit(table, n_sd=1.0)
    assert out[0] == pytest.approx(3.0)  # mean 2 + SD 1 = 3 = max
    assert np.isnan(out[1])


def test_calibrate_protocol_names_its_structures():
    clean = np.array([[2.0, 10.0], [3.0, 12.0], [4.0, 14.0], [3.0, np.nan]])
    cal = calibrate_protocol(clean, [6.0, 7.0, 8.0, 7.0], ["a", "b"])
    assert cal["mean_cv_threshold_percent"] == pytest.approx(7.0 + 2 * np.std([6, 7, 8, 7], ddof=1), abs=1e-4)
    assert cal["structure_thresholds_percent"]["a"] == pytest.approx(3.0 + 2 * np.std([2, 3, 4, 3], ddof=1),
                                                                     abs=1e-4)
    assert cal["structure_thresholds_percent"]["b"] == pytest.approx(16.0, abs=1e-4)
    with pytest.raises(ValueError, match="shape"):
        calibrate_protocol(clean, [6.0, 7.0, 8.0, 7.0], ["a"])
    with pytest.raises(ValueError, match="at least 3 clean scans"):
        calibrate_protocol(clean[:2], [6.0, 7.0], ["a", "b"])


def test_threshold_study_counts_flags_and_dice():
    study = threshold_study([6.0, 7.0, 8.0, 9.0, float("nan")], [0.8, 0.78, 0.7, 0.6, 0.5],
                            ["clean", "clean", "noise", "blur", "bias"], threshold=7.5)
    assert study["clean_scans"] == 2 and study["clean_flagged"] == 0
    assert study["degraded_scans"] == 3 and study["degraded_flagged"] == 3  # NaN CV is flagged
    assert study["mean_dice_passed"] == pytest.approx(0.79)
    assert study["mean_dice_flagged"] == pytest.approx(0.6)
    with pytest.raises(ValueError):
        threshold_study([1.0], [0.5, 0.6], ["clean"], 1.0)


def test_find_calibration_needs_the_same_ensemble_and_modality():
    cal = {"ensemble": ["b", "a"], "modality": "T1w", "protocols": {}}
    manifests = [{"name": "a"}, {"name": "b", "qc_calibration": cal}]
    assert find_calibration(manifests, ["a", "b"], "T1w")["ensemble"] == ["b", "a"]
    assert find_calibration(manifests, ["a"], "T1w") is None  # another ensemble: its CVs differ
    assert find_calibration(manifests, ["a", "b"], "T2w") is None


def test_protocol_thresholds_fall_back_per_structure_and_per_protocol():
    cal = {"protocols": {"p": {"mean_cv_threshold_percent": 5.0, "structure_thresholds_percent": {"x": 9.0}}}}
    mean, per = protocol_thresholds(cal, "p", ["background", "x", "y"], fallback=1.0)
    assert mean == 5.0 and per.tolist() == [5.0, 9.0, 5.0]
    mean, per = protocol_thresholds(cal, "other", ["background", "x"], fallback=1.0)
    assert mean == 1.0 and per.tolist() == [1.0, 1.0]
    mean, per = protocol_thresholds(None, "p", ["x"], fallback=2.5)
    assert mean == 2.5 and per.tolist() == [2.5]


def test_a_model_can_hold_the_calibrations_of_several_ensembles():
    from bids_app.core.qc_calibration import with_calibration

    first = {"ensemble": ["h", "a"], "modality": "T1w", "protocols": {"p": {"mean_cv_threshold_percent": 1.0}}}
    second = {"ensemble": ["h", "b"], "modality": "T1w", "protocols": {"p": {"mean_cv_threshold_percent": 2.0}}}
    manifest = with_calibration({"name": "h"}, first)
    assert manifest["qc_calibration"] == first  # one: a plain object
    manifest = with_calibration(manifest, second)
    assert len(manifest["qc_calibration"]) == 2
    assert find_calibration([manifest], ["a", "h"], "T1w")["protocols"]["p"]["mean_cv_threshold_percent"] == 1.0
    assert find_calibration([manifest], ["b", "h"], "T1w")["protocols"]["p"]["mean_cv_threshold_percent"] == 2.0
    # calibrating the same ensemble again replaces its entry
    redo = dict(first, protocols={"p": {"mean_cv_threshold_percent": 3.0}})
    manifest = with_calibration(manifest, redo)
    assert len(manifest["qc_calibration"]) == 2
    assert find_calibration([manifest], ["a", "h"], "T1w")["protocols"]["p"]["mean_cv_threshold_percent"] == 3.0


def test_samples_warning_and_class_thresholds():
    from bids_app.core.qc_calibration import class_thresholds, samples_warning

    assert samples_warning(None, 15) is None and samples_warning({"mc_samples": 15}, 15) is None
    assert "calibrated with 15 MC samples (this run draws 5)" in samples_warning({"mc_samples": 15}, 5)
    # a calibration without a test-time augmentation was made without one
    assert samples_warning({"mc_samples": 15}, 15, "none") is None
    assert "test-time augmentation none (this run: flip-shift)" in samples_warning({"mc_samples": 15}, 15, "flip-shift")
    both = samples_warning({"mc_samples": 15, "tta": "flip"}, 5, "none")
    assert "15 MC samples" in both and "test-time augmentation flip" in both
    assert class_thresholds(None, 2.0, 3).tolist() == [2.0, 2.0, 2.0]
    assert class_thresholds([1.0, 4.0], 2.0, 2).tolist() == [1.0, 4.0]


def test_calibrations_of_each_test_time_augmentation_are_kept_and_the_matching_one_is_found():
    from bids_app.core.qc_calibration import with_calibration

    plain = {"ensemble": ["a", "b"], "modality": "T1w", "mc_samples": 15, "protocols": {"p": {"mean_cv_threshold_percent": 1.0}}}
    views = dict(plain, tta="flip-shift", protocols={"p": {"mean_cv_threshold_percent": 4.0}})
    manifest = with_calibration(with_calibration({"name": "a"}, plain), views)
    assert len(manifest["qc_calibration"]) == 2  # another augmentation is another calibration, not a replacement
    assert find_calibration([manifest], ["a", "b"], "T1w", "flip-shift")["tta"] == "flip-shift"
    assert "tta" not in find_calibration([manifest], ["a", "b"], "T1w", "none")
    # no calibration with this augmentation: one with another is used (the segmentation warns)
    only_views = with_calibration({"name": "a"}, views)
    assert find_calibration([only_views], ["a", "b"], "T1w", "flip")["tta"] == "flip-shift"
