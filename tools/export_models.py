"""Install the stage-1 cross-validated fold models into ``bids_app/data/models/`` with their CV figures.

This is how the 0.1.0 models were installed. The 0.2.0 whole-brain and parcellation models (stage 2, fold 0
only) are exported one by one with ``arborseg-train export`` (README, "Trained models, training and
evaluation"); running this script would put the weaker stage-1 fold-1/2 CEREBRUM models back in the default
ensemble and replace the stage-2 U-Net of fold 0 (0.2.0, a default member) with its stage-1 model.

    python tools/export_models.py _train/runs _train/cv/all _train/cv/parc [_train/cv/segnet]

Every fold model gets, in its manifest's ``metrics``: its own fold's test Dice (member alone and the
fold's two-architecture ensemble) and the cross-validation summary of its kind (mean and SD over the
test subjects of all folds evaluated). Storage is float16.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "bids_app" / "data" / "models"


def overall(summary: dict, method: str) -> dict:
    out = {}
    for protocol, value in summary["methods"].get(method, {}).items():
        o = value["overall"]
        out[protocol] = {"mean_dice": o.get("dice_mean"), "sd_across_subjects": o.get("dice_sd_across_subjects"),
                         "n_subjects": len(o.get("mean_dice_per_subject") or {})}
    return out


def main(runs: str, cv_all: str, cv_parc: str, cv_segnet: str | None = None) -> None:
    runs_dir = Path(runs)
    whole = json.loads((Path(cv_all) / "cv_summary.json").read_text())
    parc = json.loads((Path(cv_parc) / "cv_summary.json").read_text())
    DEST.mkdir(parents=True, exist_ok=True)
    jobs = []
    for arch, task in (("cerebrum", "wholebrain"), ("unet", "wholebrain-unet")):
        for fold in (0, 1, 2):
            metrics = {"evaluation": "3-fold cross-validation on the 15 OASIS-TRT-20 subjects (no subject in both "
                                     "training and test), 1 mm reference, Dice per structure averaged",
                       "cv_member": overall(whole, arch), "cv_two_architecture_ensemble": overall(whole, "ensemble"),
                       "cv_joint_label_fusion_fold0": overall(whole, "jlf"),
                       "seconds_per_subject_cpu": whole.get("seconds_per_subject")}
            jobs.append((runs_dir / f"{arch}-fold{fold}" / "final", f"wholebrain-{arch}-fold{fold}", task, metrics))
    metrics = {"evaluation": "fold 0 of the 3-fold split (5 held-out OASIS-TRT-20 subjects), 1 mm reference",
               "cv_member": overall(parc, "parc-cerebrum" if "parc-cerebrum" in parc["methods"] else "ensemble")}
    if cv_segnet:
        seg = json.loads((Path(cv_segnet) / "cv_summary.json").read_text())
        metrics["segnet_same_fold"] = overall(seg, "ensemble")
    jobs.append((runs_dir / "parc-cerebrum-fold0" / "final", "parcellation-cerebrum-fold0", "parcellation", metrics))
    for final, name, task, metrics in jobs:
        path = Path("/tmp") / f"{name}_metrics.json"
        path.write_text(json.dumps(metrics))
        subprocess.run([sys.executable, "-m", "bids_app.training.cli", "export", str(final), str(DEST / name),
                        "--metrics", str(path), "--task", task, "--name", name], check=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
