"""``arborseg --list-models`` lists installed checkpoints (no positional arguments needed)."""

from __future__ import annotations

import pytest

from bids_app.cli.run import main


def test_list_models_shows_saved_checkpoint(tmp_path, monkeypatch, capsys):
    from bids_app.models.checkpoint import save_checkpoint
    from bids_app.models.registry import build

    net = build("dpn", in_channels=1, n_classes=3, base_filters=4, levels=2, convs_per_level=1)
    save_checkpoint(net, tmp_path / "dpn-toy", {
        "name": "dpn-toy", "version": "0.0.1", "architecture": "dpn",
        "label_protocol": {"name": "toy3", "labels": [{"index": i, "name": n} for i, n in
                                                      enumerate(("background", "left", "right"))]},
        "input_channels": [{"name": "T1w", "normalisation": "percentile99"}], "voxel_size_mm": 1.0,
        "training": {"data": "synthetic", "licence": "CC0-1.0", "seed": 1}, "metrics": {"dice_mean": 0.1},
    })
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        main(["--list-models"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    header, *rows = out.strip().splitlines()
    assert header.split()[:3] == ["name", "architecture", "protocol"]
    assert any(r.split()[:4] == ["dpn-toy", "dpn", "toy3", "T1w"] for r in rows), out


def test_list_models_empty(tmp_path, monkeypatch, capsys, no_package_models):
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        main(["--list-models"])
    assert exc.value.code == 0
    assert "no models installed" in capsys.readouterr().out
