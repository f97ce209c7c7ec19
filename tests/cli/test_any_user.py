"""Containers run ArborSeg as any UID with a read-only (or someone else's) home: nothing may be written
there, and the outputs follow ``--umask`` so that lab members can read them."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bids_app.cli.parser import get_parser
from tests.conftest import tiny_wholebrain_checkpoint

ARGS = ["bids", "out", "participant"]


def test_umask_option(monkeypatch):
    assert get_parser().parse_args(ARGS).umask == 0o022
    assert get_parser().parse_args([*ARGS, "--umask", "0002"]).umask == 0o002
    assert get_parser().parse_args([*ARGS, "--umask", "27"]).umask == 0o027
    monkeypatch.setenv("ARBORSEG_UMASK", "0007")
    assert get_parser().parse_args(ARGS).umask == 0o007


@pytest.mark.parametrize("value", ["abc", "0999", "01000", "0477"])
def test_umask_option_rejects(value, capsys):
    with pytest.raises(SystemExit) as exc:
        get_parser().parse_args([*ARGS, "--umask", value])
    assert exc.value.code == 2
    assert "--umask" in capsys.readouterr().err


def test_atomic_outputs_follow_the_umask(tmp_path):
    from bids_app.atomic import atomic_output
    from bids_app.reports.report import _atomic_write_text

    old = os.umask(0o027)
    try:
        with atomic_output(tmp_path / "a.json") as tmp:
            tmp.write_text("{}")
        _atomic_write_text(tmp_path / "b.html", "<html></html>")
    finally:
        os.umask(old)
    for name in ("a.json", "b.html"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


@pytest.mark.e2e
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="switching to another UID needs root and util-linux's setpriv")
def test_participant_as_unknown_uid_with_read_only_home(tmp_path, phantom_templateflow):
    """UID 23456 has no passwd entry (like ``docker run --user`` or Singularity); its HOME is read-only.

    The process keeps only CAP_DAC_READ_SEARCH (read any file), because this machine's Python lives
    under /root; it cannot write anywhere the UID itself may not.
    """
    from bids_app.core.phantom import write_demo_dataset

    bids = write_demo_dataset(tmp_path / "bids", n_subjects=1, voxel_size=2.0, seed=3)
    model = tiny_wholebrain_checkpoint(tmp_path / "models" / "tiny")
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o555)
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)
    out, work = run / "out", run / "work"
    uid = 23456
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=+dac_read_search",
           "--ambient-caps=+dac_read_search", "env", "-i", f"PATH={Path(sys.executable).parent}:/usr/bin:/bin",
           f"HOME={home}", "NIPYPE_NO_ET=1", "ARBORSEG_OFFLINE=1",
           str(Path(sys.executable).parent / "arborseg"), str(bids), str(out), "participant", "-w", str(work),
           "--template", "ArborSegPhantom", "--templateflow-home", str(phantom_templateflow), "--voxel-size", "2",
           "--nprocs", "2", "--seg-models", str(model), "--no-parc", "--mc-samples", "2", "--umask", "0027"]
    proc = subprocess.run(cmd, cwd=run, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Permission denied" not in proc.stderr, proc.stderr[-3000:]
    assert list(home.iterdir()) == []
    written = [p for p in (*out.rglob("*"), *work.rglob("*"))]
    assert any(p.name.endswith("_seg-wholebrain_dseg.nii.gz") for p in written)
    assert (work / ".cache" / "matplotlib").is_dir()  # the library caches went to the work dir
    for path in written:
        info = path.lstat()
        assert info.st_uid == uid, path
        mode = stat.S_IMODE(info.st_mode)
        assert mode & 0o027 == 0, f"{path}: {oct(mode)}"
    for path in out.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o640 == 0o640, path  # the lab group can read it
