"""``arborseg-train cv`` end to end on a tiny packed dataset: scores, the QC study, the JLF peer, merge, calibration."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bids_app.core.labels import load_protocol
from bids_app.training.cli import main as train_main
from bids_app.training.prepare import block_mean, block_mode
from tests.conftest import tiny_wholebrain_checkpoint

SHAPE = (24, 24, 24)


def _subject(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 1 mm image and dkt-aseg label values: a white-matter ball in a cortex shell, a thalamus inside."""
    dkt = load_protocol("dkt-aseg")
    names = dict(zip(dkt.names, dkt.indices))
    grid = np.indices(SHAPE).astype(float)
    shift = np.random.default_rng(seed).uniform(-1, 1, 3)
    r = np.sqrt(sum((g - 11.5 - s) ** 2 for g, s in zip(grid, shift)))
    labels = np.zeros(SHAPE, np.int32)
    labels[r < 10] = names["ctx-lh-superiorfrontal"]
    labels[r < 7] = names["Left-Cerebral-White-Matter"]
    labels[r < 3] = names["Left-Thalamus"]
    image = np.select([labels == names["Left-Thalamus"], labels == names["Left-Cerebral-White-Matter"], labels > 0],
                      [0.8, 1.0, 0.6], 0.0).astype(np.float32)
    image += np.random.default_rng(seed).normal(0, 0.02, SHAPE).astype(np.float32) * (labels > 0)
    return image, labels


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    dkt = load_protocol("dkt-aseg")
    folder = root / "data" / "oasis"
    folder.mkdir(parents=True)
    cases = []
    for i in range(6):
        image, labels = _subject(i)
        classes = dkt.to_classes(labels)
        np.savez(folder / f"c{i}.npz", img1=image, lab1=labels, img2=block_mean(image, 2).astype(np.float16),
                 cls2=block_mode(classes, 2).astype(np.uint8))
        cases.append({"case": f"c{i}", "subject": f"s{i}", "kind": "real", "source": "blobs", "licence": "none"})
    (folder / "index.json").write_text(json.dumps({"protocol": "dkt-aseg", "voxel_size_mm": 2.0, "cases": cases}))
    runs = root / "runs"
    for fold in range(3):
        stem = runs / f"cerebrum-fold{fold}" / "final"
        stem.parent.mkdir(parents=True)
        tiny_wholebrain_checkpoint(stem, seed=fold, name="tiny")
    return root


def test_cv_scores_every_protocol_and_keeps_the_qc_study(setup):
    out = setup / "out"
    assert train_main(["cv", "--data", str(setup / "data"), "--runs", str(setup / "runs"), "--out", str(out),
                       "--archs", "cerebrum", "--folds", "0", "--mc-samples", "2", "--threads", "1",
                       "--degrade-subjects", "1"]) == 0
    summary = json.loads((out / "cv_summary.json").read_text())
    assert set(summary["methods"]["ensemble"]) == {"aseg", "cerebrum7", "deep14"}  # aseg says nothing of DKT
    assert {"ensemble-noise", "ensemble-bias", "ensemble-blur", "ensemble-thick-slices"} <= set(summary["methods"])
    raw = json.loads((out / "cv_raw.json").read_text())
    tested = summary["folds"]["0"]
    clean = [q for q in raw["qc"] if q["condition"] == "clean"]
    assert sorted(q["subject"] for q in clean) == sorted(tested) and len(raw["qc"]) == len(tested) + 4
    assert set(clean[0]["structure_cv"]) == {"aseg", "cerebrum7", "deep14"}
    assert len(clean[0]["structure_cv"]["aseg"]["cv_percent"]) == len(load_protocol("aseg"))
    header = (out / "qc_study.tsv").read_text().splitlines()[0].split("\t")
    assert "structure_cv" not in header and "aseg_mean_dice" in header
    # the study calibrates the ensemble: two clean scans are too few
    model = shutil.copy(setup / "runs" / "cerebrum-fold0" / "final.json", setup / "tiny.json")
    assert train_main(["calibrate-qc", str(out), "--models", str(model)]) == 2


def test_jlf_only_for_chosen_subjects_then_merge(setup):
    from bids_app.training.trainer import fold_split, load_cases

    first, second = fold_split(load_cases(setup / "data", ["oasis"], "dkt-aseg"), 3, 0)[0][:2]

    def jlf(out, subject):  # no networks needed (the runs folder does not exist), one chosen subject
        return train_main(["cv", "--data", str(setup / "data"), "--runs", str(setup / "nothing"), "--out", str(out),
                           "--folds", "0", "--jlf-only", "--subjects", subject])

    out = setup / "jlf"
    assert jlf(out, first) == 0
    summary = json.loads((out / "cv_summary.json").read_text())
    assert list(summary["methods"]) == ["jlf"] and summary["methods"]["jlf"]["dkt-aseg"]
    raw = json.loads((out / "cv_raw.json").read_text())
    assert {r["subject"] for r in raw["rows"]} == {first} and len(raw["timing"]["jlf"]) == 1
    # four atlases of near-identical shapes: fusion finds the structures
    assert summary["methods"]["jlf"]["cerebrum7"]["overall"]["dice_mean"] > 0.6
    assert jlf(setup / "jlf2", second) == 0
    merged = setup / "merged"
    assert train_main(["cv-merge", str(out), str(setup / "jlf2"), "--out", str(merged)]) == 0
    raw = json.loads((merged / "cv_raw.json").read_text())
    assert {r["subject"] for r in raw["rows"]} == {first, second} and len(raw["timing"]["jlf"]) == 2


def test_cv_scores_the_fused_ensembles(setup, capsys):
    from tests.conftest import tiny_parcellation_checkpoint

    parc_runs = setup / "parc-runs"
    tiny_parcellation_checkpoint(parc_runs / "cerebrum-fold0" / "final", seed=3)
    out = setup / "fused"
    assert train_main(["cv", "--data", str(setup / "data"), "--runs", str(setup / "runs"), "--out", str(out),
                       "--archs", "cerebrum", "--folds", "0", "--mc-samples", "2", "--threads", "1",
                       "--refinement", "intensity", "--parc-runs", str(parc_runs)]) == 0
    summary = json.loads((out / "cv_summary.json").read_text())
    assert set(summary["methods"]) == {"fused", "fused-parc"}  # instead of the ensemble alone
    assert set(summary["methods"]["fused-parc"]) == {"dkt-aseg", "aseg", "cerebrum7", "deep14"}
    raw = json.loads((out / "cv_raw.json").read_text())
    assert len(raw["timing"]["fused"]) == len(summary["folds"]["0"]) == len(raw["qc"])
    # the two label maps agree, so both score the same in the whole-brain protocols
    for protocol in ("aseg", "cerebrum7", "deep14"):
        fused = {(r["subject"], r["label"]): r["dice"] for r in raw["rows"]
                 if r["method"] == "fused" and r["protocol"] == protocol}
        parc = {(r["subject"], r["label"]): r["dice"] for r in raw["rows"]
                if r["method"] == "fused-parc" and r["protocol"] == protocol}
        assert fused.keys() == parc.keys() and all(np.isclose(fused[k], parc[k], equal_nan=True) for k in fused)
    missing = setup / "fused-missing"
    assert train_main(["cv", "--data", str(setup / "data"), "--runs", str(setup / "runs"), "--out", str(missing),
                       "--archs", "cerebrum", "--folds", "0", "--parc-runs", str(setup / "parc-runs-none")]) != 0
    assert "no trained model" in capsys.readouterr().err and not (missing / "cv_summary.json").exists()
