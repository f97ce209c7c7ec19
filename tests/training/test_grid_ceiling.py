"""tools/grid_ceiling.py: the Dice a perfect model on a coarser grid reaches after the pipeline's up-sampling."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from bids_app.core.labels import load_protocol

TOOL = Path(__file__).resolve().parents[2] / "tools" / "grid_ceiling.py"


def _tool():
    spec = importlib.util.spec_from_file_location("grid_ceiling", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_block_constant_labels_survive_and_thin_structures_do_not(tmp_path, capsys):
    tool = _tool()
    proto = load_protocol("cerebrum7")
    values = [v for v in proto.indices if v][:3]
    labels = np.zeros((16, 16, 16), dtype=np.int32)
    labels[2:10, 2:12, 4:14] = values[0]  # aligned with the 2-voxel blocks
    labels[10:14, 2:12, 4:14] = values[1]
    assert tool.mean_dice(labels, labels, proto) == 1.0
    # block-aligned boxes keep their faces; trilinear up-sampling only rounds their outer edges and corners
    aligned = tool.mean_dice(tool.grid_round_trip(labels, proto, 2), labels, proto)
    assert 0.9 < aligned < 1.0
    thin = labels.copy()
    thin[5, 2:12, 4:14] = values[2]  # one voxel thick: it cannot win any 2 mm block outright
    ceiling = tool.mean_dice(tool.grid_round_trip(thin, proto, 2), thin, proto)
    assert ceiling < aligned - 0.1
    # the command line reads a packed folder
    (tmp_path / "index.json").write_text(json.dumps({"protocol": "cerebrum7", "cases": [
        {"case": "c0", "subject": "s0", "kind": "real"}]}))
    np.savez(tmp_path / "c0.npz", lab1=thin.astype(np.int16))
    assert tool.main([str(tmp_path), "--protocols", "cerebrum7"]) == 0
    assert f"cerebrum7: ceiling {ceiling:.3f}" in capsys.readouterr().out
