"""Merging the cerebellum CV folds (bids_app.training.cerebellum_cv merge)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bids_app.training import cerebellum_cv as cc


def _fold(folder, subjects, scores: dict[str, list[float]], per: dict[str, float]):
    """A fold's results written by the CV's own writer: ``scores[method]`` is one lobule Dice per subject."""
    rows, timing = [], {}
    for method, values in scores.items():
        for subject, value in zip(subjects, values):
            rows.append({"subject": subject, "method": method, "lobule_dice_mean": value, "cerebellum_dice": 0.9,
                         "cortex_dice": 0.85, "wm_dice": 0.8, "vermis_dice_mean": float("nan"),
                         "mean_cv_percent": 1.5, "seconds": 10.0, "per_structure": {"Left-I-II": per[method]}})
            timing.setdefault(method, []).append(10.0)
    return cc._write(folder, rows, timing, list(subjects))


def test_merge_pools_subjects_and_keeps_per_fold_figures(tmp_path):
    _fold(tmp_path / "f0", ["a", "b"], {"dpn": [0.7, 0.8], "unet": [0.6, 0.6], "only0": [0.1, 0.1]},
          {"dpn": 0.5, "unet": 0.4, "only0": 0.0})
    _fold(tmp_path / "f1", ["c"], {"dpn": [0.9], "unet": [0.3]}, {"dpn": 0.8, "unet": 0.1})
    assert cc.main(["merge", str(tmp_path / "f0"), str(tmp_path / "f1"), "--out", str(tmp_path / "all")]) == 0
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["test_subjects"] == ["a", "b", "c"]
    assert list(summary["methods"]) == ["dpn", "unet"] and summary["methods_not_in_every_fold"] == ["only0"]
    dpn = summary["methods"]["dpn"]
    assert dpn["n"] == 3
    assert dpn["lobule_dice_mean"]["mean"] == pytest.approx(0.8)
    assert dpn["lobule_dice_mean"]["std"] == pytest.approx(np.std([0.7, 0.8, 0.9]))
    assert np.isnan(dpn["vermis_dice_mean"]["mean"])
    # per-structure: the folds' means weighted by their subjects (2 x 0.5 + 1 x 0.8) / 3
    assert dpn["per_structure_dice"]["Left-I-II"] == pytest.approx(0.6)
    assert list(dpn["per_fold"].values()) == pytest.approx([0.75, 0.9])
    lines = (tmp_path / "all" / "subjects.tsv").read_text().splitlines()
    assert len(lines) == 1 + 6 and lines[0].startswith("subject\tmethod\tlobule_dice_mean")
    assert "c\tunet\t0.3000" in lines[-1] and "\tn/a\t" in lines[-1]


def test_merge_refuses_a_subject_in_two_folds_and_a_missing_folder(tmp_path, capsys):
    _fold(tmp_path / "f0", ["a", "b"], {"dpn": [0.7, 0.8]}, {"dpn": 0.5})
    _fold(tmp_path / "f1", ["b"], {"dpn": [0.9]}, {"dpn": 0.8})
    with pytest.raises(ValueError, match="subject b is a test subject of both"):
        cc.merge_cerebellum_cv([tmp_path / "f0", tmp_path / "f1"], tmp_path / "all")
    with pytest.raises(SystemExit) as stop:
        cc.main(["merge", str(tmp_path / "f0"), str(tmp_path / "nope"), "--out", str(tmp_path / "all")])
    assert stop.value.code == 2 and "nope/summary.json" in capsys.readouterr().err
    assert not (tmp_path / "all").exists()
