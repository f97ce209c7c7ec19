"""Parameters, inference time and peak memory of ArborSeg's segmentation networks.

Usage:
    python benchmarks/bench_models.py [--only unet dpn] [--cases brain cerebellum] [--mc-samples 15]
                                      [--device cpu|cuda|auto] [--threads N] [--scale 1.0]
                                      [--no-mc] [--determinism-cost] [--kwargs JSON]

For every registered architecture that imports (the others are skipped with a message), with
its default constructor arguments (randomly initialised: timing does not depend on the weights):

* ``brain``: a 1 mm whole-brain volume, 1x1x160x192x160;
* ``cerebellum``: a 0.5 mm cerebellum crop, 1x1x160x180x168 (padded by the predictor to each
  model's ``size_divisor``);

and for each case the modes

* ``plain``: ``Predictor.predict`` (whole volume or windows, as the predictor decides; the layout
  column says which), ``deterministic=True``;
* ``mc``: ``mc_dropout`` with ``--mc-samples`` samples and prefix caching;
* ``mc-nocache``: the same without prefix caching (full forward per sample); the table gives the
  measured saving ``1 - t(mc) / t(mc-nocache)`` and, from the cached run's own prefix and suffix
  times (less sensitive to machine load), the expected saving ``(N - 1) p / (N (p + s))``;
* with ``--determinism-cost``, ``plain-fast``: ``deterministic=False`` in a process with MKL's
  strict CNR mode off (``MKL_CBWR=AUTO``), i.e. what the thread-count determinism costs.

Every (model, case, mode) runs in a fresh subprocess, so the peak resident memory
(``ru_maxrss``) is that measurement's own; on CUDA the peak allocated GPU memory is reported too.
``--scale 0.5`` halves every side of the volumes for a quick run (the figures are then not the
real-size ones). The table is written through ``logging`` to stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_models")

CASES = {
    "brain": {"shape": (1, 160, 192, 160), "voxel_mm": 1.0},
    "cerebellum": {"shape": (1, 160, 180, 168), "voxel_mm": 0.5},
}


def synthetic_head(shape: tuple[int, ...], seed: int = 0):
    """A normalised-looking volume: an ellipsoid of values around 1 with structure, 0 outside."""
    import numpy as np

    rng = np.random.default_rng(seed)
    c, *spatial = shape
    grid = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in spatial], indexing="ij")
    r = np.sqrt(sum((g / 0.85) ** 2 for g in grid))
    inside = r < 1
    tissue = 0.6 + 0.4 * np.cos(6 * np.pi * r) + rng.normal(0, 0.05, size=r.shape).astype(np.float32)
    vol = np.where(inside, np.clip(tissue, 0, 2), 0).astype(np.float32)
    return np.repeat(vol[None], c, axis=0)


def _rss_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- worker (one subprocess)


def worker(arch: str, case: str, mode: str, out_path: str, args: argparse.Namespace) -> None:
    """Measure one (architecture, case, mode) and write a JSON result to ``out_path``."""
    # the predictor module must come first so MKL's strict CNR mode is set before MKL starts
    from bids_app.models import predictor as pred_mod
    from bids_app.models.mcdropout import mc_dropout

    import torch

    from bids_app.models import registry

    result: dict = {"arch": arch, "case": case, "mode": mode}
    try:
        kwargs = json.loads(args.kwargs).get(arch, {}) if args.kwargs else {}
        torch.manual_seed(0)
        model = registry.build(arch, **kwargs).eval()
    except Exception as exc:  # the architecture module is missing or broken
        result["error"] = f"{type(exc).__name__}: {exc}"
        Path(out_path).write_text(json.dumps(result))
        return
    spec = CASES[case]
    shape = tuple([spec["shape"][0]] + [max(8, int(round(s * args.scale))) for s in spec["shape"][1:]])
    in_channels = getattr(model, "config", {}).get("in_channels", 1)
    image = synthetic_head((in_channels,) + shape[1:])
    device = pred_mod.resolve_device(args.device)
    result.update(params=int(sum(p.numel() for p in model.parameters())), shape=list(image.shape),
                  device=str(device), threads=args.threads or torch.get_num_threads(),
                  determinism=pred_mod.cpu_determinism_status())
    popts = dict(device=device, num_threads=args.threads, max_voxels=args.max_voxels,
                 patch_size=args.patch_size, deterministic=(mode != "plain-fast"))
    predictor = pred_mod.Predictor(model, **popts)
    if getattr(model, "kind", "dense") == "patch":
        result["layout"] = "predict_volume"
    else:
        layout = predictor.layout_for(model, image.shape[1:])
        result["layout"] = "whole" if layout.whole else f"{len(layout.windows)}x{'x'.join(map(str, layout.window))}"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result["rss_before_mb"] = _rss_peak_mb()
    t0 = time.perf_counter()
    if mode in ("plain", "plain-fast"):
        probs = predictor.predict(image)
        result["n_classes"] = int(probs.shape[0])
    else:
        mc = mc_dropout(predictor, image, n_samples=args.mc_samples, seed=0, voxel_size_mm=spec["voxel_mm"],
                        use_prefix_cache=(mode == "mc"))
        result.update(n_classes=int(mc.mean_probs.shape[0]), mc_samples=args.mc_samples,
                      mean_cv_percent=mc.mean_cv_percent, prefix_s=mc.timing["prefix_s"],
                      suffix_s=mc.timing["suffix_s"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["seconds"] = time.perf_counter() - t0
    result["rss_peak_mb"] = _rss_peak_mb()
    Path(out_path).write_text(json.dumps(result))


# --------------------------------------------------------------------------- driver


def _module_exists(arch: str) -> bool:
    from bids_app.models.registry import ARCHITECTURES  # no torch import

    module = ARCHITECTURES[arch].split(":")[0]
    return importlib.util.find_spec(module) is not None


def run_one(arch: str, case: str, mode: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, __file__, "--worker", arch, case, mode, out, "--device", args.device,
               "--scale", str(args.scale), "--mc-samples", str(args.mc_samples)]
        for flag, value in (("--threads", args.threads), ("--max-voxels", args.max_voxels),
                            ("--patch-size", args.patch_size), ("--kwargs", args.kwargs)):
            if value is not None:
                cmd += [flag, str(value)]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        if mode == "plain-fast":
            env["MKL_CBWR"] = "AUTO"  # MKL's default dispatch, not strict
        else:
            env.pop("MKL_CBWR", None)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"arch": arch, "case": case, "mode": mode, "error": f"timed out after {args.timeout} s"}
        if proc.returncode or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"arch": arch, "case": case, "mode": mode, "error": f"exit {proc.returncode}: {tail[0]}"}
        result = json.loads(Path(out).read_text())
        result["wall_s"] = time.perf_counter() - t0
        return result


def _fmt(value, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="ARCH", help="architectures to measure (default: all)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["brain", "cerebellum"])
    parser.add_argument("--mc-samples", type=int, default=15)
    parser.add_argument("--no-mc", action="store_true", help="only plain inference")
    parser.add_argument("--determinism-cost", action="store_true",
                        help="also run deterministic=False without MKL strict CNR ('plain-fast')")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale every side of the volumes (quick runs)")
    parser.add_argument("--max-voxels", type=int, default=None, help="Predictor max_voxels (0 forces windows)")
    parser.add_argument("--patch-size", type=int, default=None, help="Predictor patch_size")
    parser.add_argument("--kwargs", default=None, help='constructor kwargs per architecture, JSON: {"unet": {...}}')
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    parser.add_argument("--worker", nargs=4, metavar=("ARCH", "CASE", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO if not args.worker else logging.WARNING, format="%(message)s",
                        stream=sys.stdout)
    if args.worker:
        worker(*args.worker, args=args)
        return 0

    from bids_app.models.registry import ARCHITECTURES

    archs = args.only or list(ARCHITECTURES)
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown architecture(s) {', '.join(unknown)}; known: {', '.join(ARCHITECTURES)}")
    modes = ["plain"] + (["plain-fast"] if args.determinism_cost else []) + ([] if args.no_mc else ["mc", "mc-nocache"])

    rows: list[dict] = []
    for arch in archs:
        if not _module_exists(arch):
            log.info("skipping %s: %s does not exist yet", arch, ARCHITECTURES[arch].split(":")[0])
            continue
        for case in args.cases:
            for mode in modes:
                log.info("measuring %s / %s / %s ...", arch, case, mode)
                res = run_one(arch, case, mode, args)
                if "error" in res:
                    log.info("  %s", res["error"])
                else:
                    log.info("  %.1f s, peak RSS %.0f MB, layout %s", res["seconds"], res["rss_peak_mb"], res["layout"])
                rows.append(res)
                if mode == "mc-nocache" and res.get("layout") == "predict_volume":
                    break
                if "error" in res and res["error"].startswith(("ModuleNotFoundError", "ImportError")):
                    break

    by_key = {(r["arch"], r["case"], r["mode"]): r for r in rows}
    header = (f"{'architecture':<12} {'params':>11} {'case':<10} {'shape':<17} {'mode':<11} {'layout':<16} "
              f"{'time s':>8} {'peak RSS MB':>11} {'GPU MB':>8} {'note':<}")
    log.info("")
    log.info("device %s, threads %s, MC samples %d, scale %g", args.device, args.threads or "default",
             args.mc_samples, args.scale)
    log.info(header)
    log.info("-" * len(header))
    for r in rows:
        if "error" in r:
            log.info("%-12s %11s %-10s %-17s %-11s %s", r["arch"], "-", r["case"], "-", r["mode"], "ERROR " + r["error"])
            continue
        note = ""
        if r["mode"] == "mc":
            ref = by_key.get((r["arch"], r["case"], "mc-nocache"))
            if ref and "seconds" in ref:
                note = f"prefix cache saves {100 * (1 - r['seconds'] / ref['seconds']):.1f}% vs {ref['seconds']:.1f} s"
            n = r["mc_samples"]
            p_s, s_s = r["prefix_s"], r["suffix_s"] / n  # one prefix, one suffix
            if p_s + s_s > 0:
                share = p_s / (p_s + s_s)
                note += (f"; prefix {p_s:.1f} s = {100 * share:.0f}% of a forward -> expected saving "
                         f"{100 * (n - 1) * share / n:.0f}% at N={n}, {100 * 14 * share / 15:.0f}% at N=15")
        elif r["mode"] == "plain-fast":
            ref = by_key.get((r["arch"], r["case"], "plain"))
            if ref and "seconds" in ref:
                note = f"determinism costs {100 * (ref['seconds'] / r['seconds'] - 1):+.1f}% time"
        shape = "x".join(str(s) for s in r["shape"])
        log.info("%-12s %11s %-10s %-17s %-11s %-16s %8.1f %11.0f %8s %s", r["arch"], f"{r['params']:,}", r["case"],
                 shape, r["mode"], r["layout"], r["seconds"], r["rss_peak_mb"], _fmt(r.get("gpu_peak_mb"), ".0f"),
                 note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
