#!/usr/bin/env python
"""Prove that ArborSeg gives the same derivatives on SLURM as on one machine.

Runs two phantom participants three times and compares the outputs:

  a. local     ``arborseg ... participant --nprocs 2`` (MultiProc), then the group level
  b. graph     the same through ``--plugin SLURMGraph --plugin-args <file>`` (one job per step)
  c. array     ``sbatch --array=0-1 --wait ci/slurm/arborseg-array.sbatch``: one participant per task,
               one shared output folder, one work folder per participant; then the group level once

b and c must equal a: every NIfTI (data array and affine), every ANTs transform, every TSV, and every
JSON file apart from the fields that name the run itself (``IGNORED_JSON_KEYS``). Needs a running
SLURM cluster whose jobs see ROOT (``ci/slurm/start-local-slurm.sh`` starts one on this machine).

    python ci/slurm/check_slurm.py /tmp/arborseg-slurm-check

ROOT keeps the phantom data between calls; the outputs and work folders of the three runs are
made anew each time. Exit status 0 when everything matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARRAY_SCRIPT = Path(__file__).resolve().with_name("arborseg-array.sbatch")
PARTICIPANTS = ("phantom01", "phantom02")

#: JSON keys whose values describe the run, not the data: the command line, run id, clock time and
#: per-stage wall times of the subject records (logs/), and the wall times of the segmentation steps
#: in the seg-*_qc.json files
IGNORED_JSON_KEYS = {"command", "run_uuid", "finished", "runtimes", "TimingsSeconds"}
#: TSV columns that are wall times (group.tsv)
IGNORED_TSV_COLUMNS = {"runtime_s"}
#: files that exist once per run (logs/config-<run id>.toml) or only after a failure
IGNORED_FILES = ("logs/config-", "logs/crash/")
#: reports, figures and logs are made from the compared data and carry run ids, dates and wall
#: times: they must exist in both runs but are not compared
EXIST_ONLY_SUFFIXES = (".html", ".svg", ".png", ".pdf", ".md", ".toml")


def log(message: str) -> None:
    print(f"[check-slurm] {message}", flush=True)


def run(cmd: list[str], *, log_file: Path, env: dict | None = None) -> tuple[int, float]:
    """Run a command with its output in ``log_file``; returns (exit code, seconds)."""
    log("$ " + " ".join(cmd))
    t0 = time.monotonic()
    with open(log_file, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.monotonic() - t0
    log(f"  exit {code} after {seconds:.0f} s (log: {log_file})")
    if code:
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        print("\n".join("    " + ln for ln in tail), flush=True)
    return code, seconds


# --------------------------------------------------------------------------------------- compare
def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in IGNORED_JSON_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _json_diff(a, b, where="") -> list[str]:
    """Paths of the differences between two stripped JSON values (at most a few)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out.append(f"{where}/{key}: only in {'the reference' if key in a else 'this run'}")
            else:
                out += _json_diff(a[key], b[key], f"{where}/{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _json_diff(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where or '/'}: {json.dumps(a)[:80]} != {json.dumps(b)[:80]}"]


def _tsv_rows(path: Path) -> list[list[str]]:
    """The rows of a TSV file without the IGNORED_TSV_COLUMNS."""
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    keep = [i for i, name in enumerate(rows[0] if rows else []) if name not in IGNORED_TSV_COLUMNS]
    return [[row[i] if i < len(row) else None for i in keep] for row in rows]


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and not p.relative_to(root).as_posix().startswith(IGNORED_FILES)}


def compare(reference: Path, other: Path) -> tuple[list[str], dict[str, int]]:
    """Differences between two output folders, and how many files of each kind were compared."""
    import nibabel as nb
    import numpy as np

    problems, counts = [], {"nifti": 0, "tsv": 0, "json": 0, "transform": 0, "exists": 0}
    ref_files, other_files = _files(reference), _files(other)
    problems += [f"{rel}: missing" for rel in sorted(ref_files - other_files)]
    problems += [f"{rel}: not in the reference run" for rel in sorted(other_files - ref_files)]
    for rel in sorted(ref_files & other_files):
        a, b = reference / rel, other / rel
        if rel.endswith((".nii", ".nii.gz")):
            ia, ib = nb.load(str(a)), nb.load(str(b))
            da, db = np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj)
            if da.dtype != db.dtype or da.shape != db.shape:
                problems.append(f"{rel}: {da.dtype}{da.shape} != {db.dtype}{db.shape}")
            elif not np.array_equal(da, db, equal_nan=da.dtype.kind == "f"):
                diff = np.abs(da.astype(np.float64) - db.astype(np.float64))
                problems.append(f"{rel}: data differ in {int((diff > 0).sum())} voxels (max {np.nanmax(diff):.3g})")
            if not np.array_equal(ia.affine, ib.affine):
                problems.append(f"{rel}: affines differ")
            counts["nifti"] += 1
        elif rel.endswith(".tsv"):
            la, lb = _tsv_rows(a), _tsv_rows(b)
            if la != lb:
                first = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
                problems.append(f"{rel}: line {first + 1} differs")
            counts["tsv"] += 1
        elif rel.endswith(".json"):
            diffs = _json_diff(_strip(json.loads(a.read_text())), _strip(json.loads(b.read_text())))
            problems += [f"{rel}: {d}" for d in diffs[:5]]
            counts["json"] += 1
        elif rel.endswith((".mat", ".h5", ".txt")):  # ANTs transforms: binary
            if a.read_bytes() != b.read_bytes():
                problems.append(f"{rel}: transform files differ")
            counts["transform"] += 1
        elif rel.endswith(EXIST_ONLY_SUFFIXES):
            counts["exists"] += 1
        else:
            problems.append(f"{rel}: unexpected kind of file (teach check_slurm.py how to compare it)")
    return problems, counts


# -------------------------------------------------------------------------------------------- runs
def prepare(root: Path) -> tuple[Path, Path]:
    """The phantom dataset and template (kept between calls)."""
    from bids_app.cli.demo import write_phantom_templateflow
    from bids_app.core.phantom import write_demo_dataset

    bids, home = root / "bids", root / "templateflow"
    if not (bids / "dataset_description.json").is_file():
        log(f"writing {len(PARTICIPANTS)} phantom participants to {bids}")
        write_demo_dataset(bids, n_subjects=len(PARTICIPANTS), voxel_size=2.0, seed=3)
    if not (home / "tpl-ArborSegPhantom").is_dir():
        write_phantom_templateflow(home, target_res_mm=4.0, reference_res_mm=2.0)
    return bids, home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder for data, outputs and work dirs (visible to the jobs)")
    parser.add_argument("--arborseg", default=str(Path(sys.executable).with_name("arborseg")),
                        help="the arborseg command (default: next to this Python)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folders after a successful check")
    opts = parser.parse_args(argv)

    for tool in ("sbatch", "squeue", "sinfo"):
        if shutil.which(tool) is None:
            log(f"ERROR: {tool} not found: start a cluster first (ci/slurm/start-local-slurm.sh)")
            return 1
    root = opts.root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    for name in ("out-local", "out-graph", "out-array", "work-local", "work-graph", "work-array", "logs"):
        shutil.rmtree(root / name, ignore_errors=True)
    (root / "logs").mkdir()
    bids, home = prepare(root)
    env = dict(os.environ, NIPYPE_NO_ET="1", ARBORSEG_OFFLINE="1")
    # short on 2 CPUs: the phantom at 2 mm, the installed models with 2 MC-dropout samples. One thread
    # per step: ANTs' non-local means denoising gives different voxels from run to run with more
    # than one ITK thread, so only single-threaded steps can be compared bit for bit
    common = ["--template", "ArborSegPhantom", "--templateflow-home", str(home), "--voxel-size", "2",
              "--mc-samples", "2", "--omp-nthreads", "1"]
    arborseg = [opts.arborseg]
    results: dict[str, dict] = {}

    def participant(name: str, *extra: str) -> None:
        out = root / f"out-{name}"
        code, seconds = run([*arborseg, str(bids), str(out), "participant", "-w", str(root / f"work-{name}"),
                             *common, *extra], log_file=root / "logs" / f"{name}.log", env=env)
        results[name] = {"code": code, "seconds": seconds}

    def group(name: str) -> None:
        code, seconds = run([*arborseg, str(bids), str(root / f"out-{name}"), "group"],
                            log_file=root / "logs" / f"{name}-group.log", env=env)
        results[name]["group_code"], results[name]["group_seconds"] = code, seconds

    log("a. local reference run (MultiProc, 2 processes)")
    participant("local", "--nprocs", "2")
    group("local")

    log("b. SLURMGraph: one SLURM job per step, submitted at once with dependencies")
    plugin_args = root / "plugin-args.json"
    plugin_args.write_text(json.dumps({"sbatch_args": "--time=30"}) + "\n")
    participant("graph", "--nprocs", "2", "--plugin", "SLURMGraph", "--plugin-args", str(plugin_args))
    group("graph")

    log("c. job array: one participant per task, shared output folder, work/sub-<label> per task")
    array_env = dict(env, BIDS_DIR=str(bids), OUT_DIR=str(root / "out-array"), WORK_ROOT=str(root / "work-array"),
                     ARBORSEG_CMD=" ".join(arborseg), ARBORSEG_ARGS=" ".join(common))
    code, seconds = run(["sbatch", "--wait", f"--array=0-{len(PARTICIPANTS) - 1}", "--cpus-per-task=1",
                         "--mem=1G", "--time=30", f"--output={root / 'logs' / 'array-%a.log'}",
                         str(ARRAY_SCRIPT)], log_file=root / "logs" / "array-sbatch.log", env=array_env)
    results["array"] = {"code": code, "seconds": seconds}
    for i, label in enumerate(PARTICIPANTS):
        task_log = root / "logs" / f"array-{i}.log"
        text = task_log.read_text(errors="replace") if task_log.is_file() else ""
        if f"sub-{label}" not in text.split("\n", 1)[0]:
            log(f"  array task {i} did not run sub-{label} (first line: {text.splitlines()[:1]})")
            results["array"]["code"] = results["array"]["code"] or 1
    group("array")

    log("comparing b (graph) and c (array) with a (local)")
    failed = [f"{name}: participant level exit {r['code']}, group level exit {r.get('group_code')}"
              for name, r in results.items() if r["code"] or r.get("group_code")]
    for label in PARTICIPANTS:
        for name in ("graph", "array"):
            preproc = root / f"out-{name}" / f"sub-{label}" / "anat" / f"sub-{label}_desc-preproc_T1w.nii.gz"
            if not preproc.is_file():
                failed.append(f"{name}: no derivatives of sub-{label}")
    counts = {}
    for name in ("graph", "array"):
        problems, counts = compare(root / "out-local", root / f"out-{name}")
        failed += [f"{name}: {p}" for p in problems]

    print("\n=== SLURM check summary ===")
    for name, r in results.items():
        group_part = f", group {r['group_seconds']:.0f} s (exit {r['group_code']})" if "group_code" in r else ""
        print(f"  {name:<6} participant level {r['seconds']:6.0f} s (exit {r['code']}){group_part}")
    print(f"  compared per run: {counts.get('nifti', 0)} NIfTI, {counts.get('tsv', 0)} TSV, "
          f"{counts.get('json', 0)} JSON (ignoring {', '.join(sorted(IGNORED_JSON_KEYS))}; TSV column "
          f"{', '.join(sorted(IGNORED_TSV_COLUMNS))}), "
          f"{counts.get('transform', 0)} transforms; {counts.get('exists', 0)} reports/figures/logs only exist")
    if failed:
        print(f"  FAILED: {len(failed)} problem(s)")
        for line in failed[:60]:
            print(f"    {line}")
        return 1
    print("  OK: the SLURMGraph and job-array derivatives equal the local run's")
    if not opts.keep_work:
        for name in ("work-local", "work-graph", "work-array"):
            shutil.rmtree(root / name, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
