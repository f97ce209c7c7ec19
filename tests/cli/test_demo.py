"""``arborseg-demo``: generates the phantom dataset and template, runs both levels, prints the report path."""

from __future__ import annotations

from pathlib import Path

import pytest

from bids_app.cli.demo import main

pytestmark = pytest.mark.e2e


def test_demo_runs_offline_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "no-templates-here"))
    code = main([str(tmp_path / "demo"), "--n-subjects", "1", "--voxel-size", "3", "--nprocs", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = Path(captured.out.strip().splitlines()[-1])
    assert report == tmp_path / "demo" / "derivatives" / "group.html" and report.is_file()
    assert (tmp_path / "demo" / "derivatives" / "sub-phantom01.html").is_file()
    assert (tmp_path / "demo" / "templateflow" / "tpl-ArborSegPhantom").is_dir()
    assert "generating the phantom template" in captured.err
    # a second call re-uses the dataset and the work dir
    assert main([str(tmp_path / "demo"), "--n-subjects", "1", "--voxel-size", "3", "--nprocs", "2"]) == 0
    assert "re-using the phantom dataset" in capsys.readouterr().err
