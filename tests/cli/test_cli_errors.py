"""Every bad-input path of the CLI: one clear line naming the file and problem, non-zero exit,
no traceback, nothing written into the input dataset."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest

from bids_app.cli.run import main
from bids_app.errors import EXIT_INPUT, EXIT_PARTICIPANT_FAILED, EXIT_RESOURCE, EXIT_USAGE
from tests.conftest import blob_volume, tree_state, write_nifti


def _run(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _common(tmp_path, tf):
    return ["-w", tmp_path / "work", "--template", "ArborSegPhantom", "--templateflow-home", tf, "--nprocs", "1"]


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "| ERROR" in ln]


def test_not_a_bids_folder(tmp_path, capsys, phantom_templateflow):
    (tmp_path / "empty").mkdir()
    code, err = _run([tmp_path / "empty", tmp_path / "out", "participant", *_common(tmp_path, phantom_templateflow)],
                     capsys)
    assert code == EXIT_INPUT
    assert "not a BIDS dataset" in err and "dataset_description.json" in err
    assert len(_error_lines(err)) == 1


def test_missing_bids_folder(tmp_path, capsys, phantom_templateflow):
    code, err = _run([tmp_path / "nope", tmp_path / "out", "participant", *_common(tmp_path, phantom_templateflow)],
                     capsys)
    assert code == EXIT_INPUT and "does not exist" in err


@pytest.mark.parametrize("flag,value,needle", [
    ("--participant-label", "sub-99", "participant label(s) not found: sub-99"),
    ("--session-label", "ses-B", "session label(s) not found"),
])
def test_unknown_labels(tmp_path, capsys, make_bids, phantom_templateflow, flag, value, needle):
    bids = make_bids({"01": {"T1w": blob_volume()}})
    before = tree_state(bids)
    code, err = _run([bids, tmp_path / "out", "participant", flag, value, *_common(tmp_path, phantom_templateflow)],
                     capsys)
    assert code == EXIT_INPUT
    assert needle in err and "available" in err
    assert tree_state(bids) == before


def _corrupt_truncated(path):
    write_nifti(path, blob_volume())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_garbage(path):
    path.write_bytes(np.random.default_rng(0).bytes(3000))


def _nan(path):
    vol = blob_volume()
    vol[5, 5, 5] = np.nan
    write_nifti(path, vol)


def _inf(path):
    vol = blob_volume()
    vol[5, 5, 5] = np.inf
    write_nifti(path, vol)


def _zero(path):
    write_nifti(path, np.zeros((40, 48, 40), np.float32))


def _two_d(path):
    write_nifti(path, blob_volume()[:, :, :1])


@pytest.mark.parametrize("writer,needle", [
    (_corrupt_truncated, "truncated"),
    (_corrupt_garbage, "not a readable NIfTI"),
    (_nan, "NaN or Inf"),
    (_inf, "NaN or Inf"),
    (_zero, "all voxels are zero"),
    (_two_d, "2D image"),
])
def test_bad_t1w_images(tmp_path, capsys, make_bids, phantom_templateflow, writer, needle):
    bids = make_bids({"01": {"T1w": writer}})
    before = tree_state(bids)
    code, err = _run([bids, tmp_path / "out", "participant", *_common(tmp_path, phantom_templateflow)], capsys)
    assert code == EXIT_PARTICIPANT_FAILED
    errors = _error_lines(err)
    # the problem line names the file and the problem; the summary repeats it for the subject
    assert any("sub-01_T1w.nii.gz" in ln and needle in ln for ln in errors), err
    assert "0 succeeded, 1 failed" in err
    assert tree_state(bids) == before
    record = json.loads((tmp_path / "out" / "logs" / "sub-01_record.json").read_text())
    assert record["status"] == "failed" and needle in record["error"]
    assert (tmp_path / "out" / "sub-01.html").is_file()


def test_unreadable_file(tmp_path, capsys, make_bids, phantom_templateflow, monkeypatch):
    bids = make_bids({"01": {"T1w": blob_volume()}})
    target = str(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    real_open = builtins.open

    def guarded(file, *args, **kwargs):  # root can read anything; simulate a permission problem
        if str(file) == target:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    code, err = _run([bids, tmp_path / "out", "participant", *_common(tmp_path, phantom_templateflow)], capsys)
    assert code == EXIT_PARTICIPANT_FAILED
    assert any("sub-01_T1w.nii.gz" in ln and "cannot be read (Permission denied)" in ln for ln in _error_lines(err))


def test_subject_without_t1w(tmp_path, capsys, make_bids, phantom_templateflow):
    bids = make_bids({"01": {"T2w": blob_volume()}})
    code, err = _run([bids, tmp_path / "out", "participant", *_common(tmp_path, phantom_templateflow)], capsys)
    assert code == EXIT_PARTICIPANT_FAILED
    assert "sub-01: no T1w image found" in err


def test_template_missing_offline(tmp_path, capsys, make_bids, monkeypatch):
    monkeypatch.setenv("ARBORSEG_OFFLINE", "1")
    bids = make_bids({"01": {"T1w": blob_volume()}})
    empty = tmp_path / "tf"
    empty.mkdir()
    code, err = _run([bids, tmp_path / "out", "participant", "-w", tmp_path / "work", "--templateflow-home", empty],
                     capsys)
    assert code == EXIT_RESOURCE
    line = _error_lines(err)[0]
    assert "TEMPLATEFLOW_HOME" in line and "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz" in line
    # the resource, where it was looked for, and how to provide it
    assert "MNI152NLin6Asym-T1w-2mm" in line and str(empty) in line and "arborseg-resources fetch" in line
    assert str(tmp_path / "work" / "cache" / "templateflow") in line
    # stopped before any work: nothing written at all
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_output_inside_input_refused(tmp_path, capsys, make_bids, phantom_templateflow):
    bids = make_bids({"01": {"T1w": blob_volume()}})
    before = tree_state(bids)
    code, err = _run([bids, bids / "sub-01" / "out", "participant", *_common(tmp_path, phantom_templateflow)], capsys)
    assert code == EXIT_INPUT and "inside the input dataset" in err
    code, err = _run([bids, bids, "participant", *_common(tmp_path, phantom_templateflow)], capsys)
    assert code == EXIT_INPUT
    code, err = _run([bids, tmp_path / "out", "participant", "-w", bids / "work", "--template", "ArborSegPhantom",
                      "--templateflow-home", phantom_templateflow], capsys)
    assert code == EXIT_INPUT and "work directory is inside the input dataset" in err
    assert tree_state(bids) == before


def test_bad_filter_file(tmp_path, capsys, make_bids, phantom_templateflow):
    bids = make_bids({"01": {"T1w": blob_volume()}})
    bad = tmp_path / "filter.json"
    bad.write_text("{not json")
    code, err = _run([bids, tmp_path / "out", "participant", "--bids-filter-file", bad,
                      *_common(tmp_path, phantom_templateflow)], capsys)
    assert code == EXIT_INPUT and "filter.json" in err and "not valid JSON" in err
    bad.write_text(json.dumps({"bold": {}}))
    code, err = _run([bids, tmp_path / "out", "participant", "--bids-filter-file", bad,
                      *_common(tmp_path, phantom_templateflow)], capsys)
    assert code == EXIT_INPUT and "unknown keys ['bold']" in err


def test_group_without_participants(tmp_path, capsys, make_bids):
    bids = make_bids({"01": {"T1w": blob_volume()}})
    code, err = _run([bids, tmp_path / "out", "group"], capsys)
    assert code == EXIT_INPUT and "run the participant level first" in err


def test_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), str(tmp_path / "o"), "everything"])
    assert exc.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), str(tmp_path / "o"), "participant", "--nprocs", "0"])
    assert exc.value.code == EXIT_USAGE


def test_version(capsys):
    from bids_app import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_four_d_t1w_uses_first_volume(tmp_path):
    from bids_app.bids import AnatInputs
    from bids_app.cli.participant import SubjectRun, preflight

    vol = np.stack([blob_volume(seed=i) for i in range(3)], axis=-1)
    path = write_nifti(tmp_path / "sub-01_T1w.nii.gz", vol)
    run = SubjectRun(inputs=AnatInputs(subject="01", session=None, t1w=path))
    preflight(run)
    assert run.status == "pending"
    assert any("4D image with 3 volumes; using the first volume" in w for w in run.warnings)


def test_bad_seg_models_fail_before_any_work(tmp_path, capsys, make_bids, phantom_templateflow):
    bids = make_bids({"01": {"T1w": blob_volume()}})
    out = tmp_path / "out"
    code, err = _run([bids, out, "participant", "--seg-models", tmp_path / "missing.json",
                      *_common(tmp_path, phantom_templateflow)], capsys)
    assert code == EXIT_RESOURCE
    errors = _error_lines(err)
    assert len(errors) == 1 and "missing" in errors[0] and "no such model checkpoint" in errors[0]
    assert not out.exists() and not (tmp_path / "work").exists()
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(b"\x80\x04K\x01.")
    code, err = _run([bids, out, "participant", "--seg-models", pickled, *_common(tmp_path, phantom_templateflow)],
                     capsys)
    assert code == EXIT_RESOURCE and "pickle-based checkpoints" in err and not out.exists()


def test_seg_usage_errors(tmp_path):
    for extra in (["--seg-models", str(tmp_path / "m.json"), "--no-seg"], ["--mc-samples", "0"]):
        with pytest.raises(SystemExit) as exc:
            main([str(tmp_path), str(tmp_path / "o"), "participant", *extra])
        assert exc.value.code == EXIT_USAGE


def test_bad_parc_models_fail_before_any_work(tmp_path, capsys, make_bids, phantom_templateflow):
    from tests.conftest import tiny_parcellation_checkpoint, tiny_wholebrain_checkpoint

    bids = make_bids({"01": {"T1w": blob_volume()}})
    out = tmp_path / "out"
    bad = tiny_parcellation_checkpoint(tmp_path / "bad-parc")
    weights = bad.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    aseg = tiny_wholebrain_checkpoint(tmp_path / "aseg")
    dkt = tiny_wholebrain_checkpoint(tmp_path / "dkt", protocol="dkt-aseg")
    parc = tiny_parcellation_checkpoint(tmp_path / "parc")
    capsys.readouterr()  # the checkpoint writer's log lines (the root handler may still hold an old stream)
    code, err = _run([bids, out, "participant", "--parc-models", bad, *_common(tmp_path, phantom_templateflow)],
                     capsys)
    assert code == EXIT_RESOURCE
    errors = _error_lines(err)
    assert len(errors) == 1 and "bad-parc.safetensors" in errors[0] and "checksum mismatch" in errors[0]
    assert not out.exists() and not (tmp_path / "work").exists()
    # an aseg ensemble is not a parcellation
    code, err = _run([bids, out, "participant", "--parc-models", aseg, *_common(tmp_path, phantom_templateflow)],
                     capsys)
    assert code == EXIT_RESOURCE and "whole-brain protocol" in err and not out.exists()
    # whole-brain models in the parcellation's protocol would write the same seg-dkt files
    code, err = _run([bids, out, "participant", "--seg-models", dkt, "--parc-models", parc,
                      *_common(tmp_path, phantom_templateflow)], capsys)
    assert code == EXIT_RESOURCE and "seg-dkt" in err and "--no-parc" in err and not out.exists()
