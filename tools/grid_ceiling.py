"""Dice ceiling of a model that segments on a coarser grid than the 1 mm reference.

A perfect model on the 2 mm model grid would output, per class, the fraction of each 2 mm block that
the class covers. The pipeline upsamples those probabilities to 1 mm (trilinear) and takes the most
probable class. This script does exactly that with the reference labels themselves, for every
OASIS case packed by ``arborseg-train prepare``, and prints the mean Dice per protocol: the best a
model on that grid can score, whatever its training.

    python tools/grid_ceiling.py _train/oasis [--factor 2] [--protocols deep14 cerebrum7 aseg dkt-aseg]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bids_app.core.labels import load_protocol, merge_labels  # noqa: E402
from bids_app.core.metrics import confusion, dice  # noqa: E402
from bids_app.models.segment import block_mean, upsample  # noqa: E402


def grid_round_trip(labels: np.ndarray, protocol, factor: int) -> np.ndarray:
    """Labels of ``protocol`` -> per-class block fractions on the coarse grid -> upsampled -> argmax labels."""
    classes = protocol.to_classes(labels)
    best = np.full(labels.shape, -1.0, dtype=np.float32)
    out = np.zeros(labels.shape, dtype=np.int32)
    for position in np.unique(classes):
        coarse = block_mean((classes == position).astype(np.float32), (factor,) * 3)
        prob = upsample(coarse[None], labels.shape, (factor,) * 3)[0]
        better = prob > best
        best[better] = prob[better]
        out[better] = protocol.indices[int(position)]
    return out


def mean_dice(pred: np.ndarray, ref: np.ndarray, protocol) -> float:
    """Mean Dice over the protocol's structures present in ``ref`` (background left out)."""
    present = [v for v in protocol.indices if v != 0 and np.any(ref == v)]
    return float(np.mean([dice(*confusion(pred == v, ref == v)[:3]) for v in present]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packed", type=Path, help="folder of arborseg-train prepare (OASIS cases)")
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--protocols", nargs="+", default=["deep14", "cerebrum7", "aseg", "dkt-aseg"])
    parser.add_argument("--max-cases", type=int)
    args = parser.parse_args(argv)
    index = json.loads((args.packed / "index.json").read_text())
    source = load_protocol(index["protocol"])
    cases = [c for c in index["cases"] if c["kind"] == "real"][: args.max_cases]
    table: dict[str, list[float]] = {p: [] for p in args.protocols}
    for case in cases:
        with np.load(args.packed / f"{case.get('file', case['case'])}.npz") as npz:
            lab1 = npz["lab1"].astype(np.int32)
        for name in args.protocols:
            proto = load_protocol(name)
            ref = lab1 if name == source.name else merge_labels(lab1, source, proto)
            table[name].append(mean_dice(grid_round_trip(ref, proto, args.factor), ref, proto))
        print(case["subject"], " ".join(f"{p}={v[-1]:.3f}" for p, v in table.items()), flush=True)
    for name, values in table.items():
        print(f"{name}: ceiling {np.mean(values):.3f} +- {np.std(values):.3f} over {len(values)} subjects "
              f"({args.factor} mm grid)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
