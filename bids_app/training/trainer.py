"""The training loop of ``arborseg-train fit``: seeded, resumable, with progress and ETA.

A run folder holds ``config.toml`` (the configuration used), ``state.safetensors`` + ``state.json``
(weights, optimiser moments, random-number states and the iteration, written atomically every
``checkpoint_every`` iterations, so a stop loses at most that many), ``log.tsv`` (one row per
logged iteration) and, at the end, ``final.safetensors`` + ``final.json``: an ArborSeg model
checkpoint (see :mod:`bids_app.models.checkpoint`) ready for ``arborseg-train export``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bids_app.atomic import atomic_output
from bids_app.core.labels import class_merge_matrix, load_mapping, load_protocol, merge_chain
from bids_app.models.checkpoint import save_checkpoint
from bids_app.models.registry import architecture_class

from .augment import AugmentConfig, make_sample
from .losses import SegmentationLoss, hard_dice
from .prepare import kfold_subjects

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a run depends on; read from a TOML file (see ``configs/train/``)."""

    name: str
    architecture: str
    model: dict
    protocol: str = "dkt-aseg"
    folders: list = field(default_factory=lambda: ["oasis"])
    real_fraction: float = 0.75
    augment: dict = field(default_factory=dict)
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    schedule: str = "poly"
    warmup: int = 20
    iterations: int = 800
    batch_size: int = 1
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    dice: str = "plain"
    seed: int = 1
    checkpoint_every: int = 50
    log_every: int = 10
    cv_folds: int = 3
    cv_seed: int = 0
    version: str = "0.1.0"
    init_from: str = ""  # checkpoint to start from; "{fold}" is replaced by the fold number
    task: str = "wholebrain"  # the manifest's task (how the pipeline finds the model)
    #: the manifest's input channels (default: one T1w channel); extra channels (e.g. the atlas
    #: prior) come from the packed cases' ``prior`` arrays
    input_channels: list = field(default_factory=list)
    licence: str = "CC BY-NC-SA 3.0 (trained on Mindboggle-101 / OASIS-TRT-20 labels)"

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python < 3.11
            import tomli as tomllib
        raw = _read_toml(Path(path), tomllib)
        flat: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, dict) and key in ("optim", "loss", "run", "data", "cv"):
                flat.update(value)
            else:
                flat[key] = value
        flat.update({k: v for k, v in overrides.items() if v is not None})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"{path}: unknown configuration keys {unknown}")
        return cls(**flat)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _read_toml(path: Path, tomllib, seen: tuple = ()) -> dict:
    """A config file's tables; ``extends = "base.toml"`` (relative to the file) starts from that file's tables,
    and every key given here replaces the base's (tables are merged key by key)."""
    if path.resolve() in seen:
        raise ValueError(f"{path}: 'extends' loops back to this file")
    raw = tomllib.loads(path.read_text())
    base = raw.pop("extends", None)
    if base is None:
        return raw
    merged = _read_toml(path.parent / base, tomllib, seen + (path.resolve(),))
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def learning_rate(cfg: TrainConfig, it: int) -> float:
    """Linear warm-up, then ``poly`` (nnU-Net, power 0.9), ``cosine`` or ``constant``."""
    if it < cfg.warmup:
        return cfg.lr * (it + 1) / cfg.warmup
    t = min(1.0, (it - cfg.warmup) / max(1, cfg.iterations - cfg.warmup))
    if cfg.schedule == "poly":
        return cfg.lr * (1 - t) ** 0.9
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "constant":
        return cfg.lr
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


# --------------------------------------------------------------------------- data


def load_cases(data_root: Path, folders: list[str], protocol: str) -> list[dict]:
    """Load every packed case of ``folders`` (each with an ``index.json``) as torch tensors.

    Cases packed for a finer protocol are merged to ``protocol`` through the merge tables.
    """
    cases = []
    target = load_protocol(protocol)
    for folder in folders:
        root = Path(data_root) / folder
        index_path = root / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path}: no packed training data (run 'arborseg-train prepare')")
        index = json.loads(index_path.read_text())
        source = load_protocol(index["protocol"])
        lut = None
        if source.name != protocol:
            chain = merge_chain(source.name, protocol)
            lut = np.arange(len(source))
            current = source
            for dst in chain[1:]:
                nxt = load_protocol(dst)
                lut = class_merge_matrix(current, nxt, load_mapping(current.name, dst))[lut]
                current = nxt
        for entry in index["cases"]:
            with np.load(root / f"{entry.get('file', entry['case'])}.npz") as npz:
                classes = npz["cls2"].astype(np.int64)
                if lut is not None:
                    classes = lut[classes]
                case = dict(entry)
                case["classes"] = torch.from_numpy(classes.astype(np.uint8))
                fg = np.argwhere(classes > 0)
                case["foreground"] = torch.from_numpy(fg[:: max(1, len(fg) // 4000)].astype(np.int64))
                if entry["kind"] == "real":
                    case["image"] = torch.from_numpy(npz["img2"].astype(np.float32))[None]
                    case["lab1"] = None  # the 1 mm reference is read by the evaluation, not here
                else:
                    case["gen"] = torch.from_numpy(npz["gen2"].astype(np.uint8))
                    case["n_gen"] = int(npz["gen_values"].size)
                if "prior" in npz.files:  # extra input channels (the atlas prior), never corrupted
                    case["prior"] = torch.from_numpy(npz["prior"].astype(np.float32))
            case["voxel_size_mm"] = float(index.get("voxel_size_mm", 2.0))
            cases.append(case)
    if len({c["voxel_size_mm"] for c in cases}) > 1:
        raise ValueError(f"{folders}: the packed folders have different voxel sizes")
    if len(target) > 256:
        raise ValueError(f"protocol {protocol} has more than 256 classes")
    return cases


def fold_split(cases: list[dict], k: int, seed: int) -> list[list[str]]:
    """Test subjects of every fold, from the real cases' subjects."""
    subjects = sorted({c["subject"] for c in cases if c["kind"] == "real"})
    return kfold_subjects(subjects, k, seed)


# --------------------------------------------------------------------------- state


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"opt.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(run_dir: Path, model, opt, gen: torch.Generator, it: int, history: list, cfg: TrainConfig) -> None:
    from safetensors.torch import save as st_save

    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update(opt_tensors)
    tensors["rng.augment"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    with atomic_output(run_dir / "state.safetensors") as tmp:
        Path(tmp).write_bytes(st_save(tensors))
    meta = {"iteration": it, "optimizer": opt_meta, "history": history, "config": cfg.to_dict()}
    with atomic_output(run_dir / "state.json") as tmp:
        Path(tmp).write_text(json.dumps(meta) + "\n")


def load_state(run_dir: Path, model, opt, gen: torch.Generator) -> tuple[int, list]:
    from safetensors.torch import load_file

    tensors = load_file(str(run_dir / "state.safetensors"))
    meta = json.loads((run_dir / "state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    _restore_optimizer(opt, tensors, meta["optimizer"])
    gen.set_state(tensors["rng.augment"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["iteration"]), list(meta["history"])


# --------------------------------------------------------------------------- loop


def initialise_from(model, checkpoint: Path, protocol) -> None:
    """Start from a trained checkpoint, possibly of a coarser protocol (transfer to a finer one).

    Tensors of equal shape are copied. Tensors whose first axis is the class axis of the source
    protocol (the output layer) are expanded to the finer protocol through the merge table: every
    fine class starts as its coarse parent, with ``log(number of siblings)`` taken off its bias
    so that the parent's probability is shared among its children.
    """
    from bids_app.models.checkpoint import load_checkpoint

    source, manifest = load_checkpoint(checkpoint)
    src_protocol = load_protocol(manifest["label_protocol"]["name"])
    parent = None
    if src_protocol.name != protocol.name:
        chain = merge_chain(protocol.name, src_protocol.name)
        parent = np.arange(len(protocol))
        current = protocol
        for dst in chain[1:]:
            nxt = load_protocol(dst)
            parent = class_merge_matrix(current, nxt, load_mapping(current.name, dst))[parent]
            current = nxt
    own = model.state_dict()
    copied = expanded = 0
    with torch.no_grad():
        for key, value in source.state_dict().items():
            if key not in own:
                continue
            if own[key].shape == value.shape:
                own[key].copy_(value)
                copied += 1
            elif (parent is not None and value.shape[0] == len(src_protocol)
                  and own[key].shape[0] == len(protocol) and own[key].shape[1:] == value.shape[1:]):
                idx = torch.as_tensor(parent)
                own[key].copy_(value[idx])
                if own[key].ndim == 1:  # bias: share the parent's probability among its children
                    siblings = torch.bincount(idx, minlength=len(src_protocol)).float()[idx].to(own[key].device)
                    own[key].sub_(torch.log(siblings))
                expanded += 1
    model.load_state_dict(own)
    log.info("initialised from %s: %d tensors copied, %d expanded %s -> %s", checkpoint, copied, expanded,
             src_protocol.name, protocol.name)


#: iterations timed before a time budget fixes the run's length
BUDGET_PROBE_ITERATIONS = 50


def budget_iterations(start: int, done: int, elapsed_s: float, budget_s: float, configured: int) -> int:
    """Total iterations of a run that has ``budget_s`` seconds of wall time in this call.

    ``done`` iterations (after iteration ``start``) took ``elapsed_s``; the rest of the budget is
    filled at that rate. Never fewer than the iterations already done plus one, never more than
    ``configured`` (the budget shortens a run, it does not lengthen it).
    """
    if budget_s <= 0 or done <= 0:
        raise ValueError("a time budget needs a positive budget and at least one timed iteration")
    rate = elapsed_s / done
    total = start + done + int(max(0.0, budget_s - elapsed_s) / rate)
    return max(start + done + 1, min(int(configured), total))


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class _Progress:
    """Loss and one training metric averaged over ``log_every`` iterations: history, log line with ETA."""

    def __init__(self, cfg: TrainConfig, metric: str, history: list):
        self.cfg, self.metric, self.history = cfg, metric, history
        self.t0, self.done, self.window = time.time(), 0, []

    def step(self, it: int, loss: float, value: float, lr: float) -> None:
        self.done += 1
        self.window.append((loss, value))
        if it % self.cfg.log_every and it != self.cfg.iterations:
            return
        rate = (time.time() - self.t0) / self.done
        mean_loss = float(np.mean([w[0] for w in self.window]))
        mean_value = float(np.nanmean([w[1] for w in self.window]))
        self.history.append({"iteration": it, "loss": round(mean_loss, 5), self.metric: round(mean_value, 4),
                             "lr": lr, "s_per_it": round(rate, 3)})
        self.window = []
        log.info("%s it %d/%d loss %.4f %s %.3f lr %.2e %.2f s/it ETA %s", self.cfg.name, it, self.cfg.iterations,
                 mean_loss, self.metric, mean_value, lr, rate, _format_eta(rate * (self.cfg.iterations - it)))


def _save_final(model, run_dir: Path, cfg: TrainConfig, protocol, fold, it: int, test_subjects: list,
                cases: list, history: list, *, n_real: int, n_labelmap: int) -> Path:
    """The finished network as an ArborSeg checkpoint ``run_dir/final`` with a full manifest."""
    model.eval()
    last = history[-1] if history else {}
    fields = {
        "name": cfg.name if fold is None else f"{cfg.name}-fold{fold}",
        "version": cfg.version,
        "task": cfg.task,
        "label_protocol": protocol.as_manifest(),
        "input_channels": cfg.input_channels or [{"name": "T1w", "normalisation": "percentile99"}],
        "voxel_size_mm": cases[0]["voxel_size_mm"],
        "training": {
            "data": ", ".join(sorted({c["source"] for c in cases})),
            "licence": cfg.licence,
            "seed": cfg.seed, "iterations": it, "fold": fold, "cv_folds": cfg.cv_folds,
            "test_subjects": test_subjects, "n_real_cases": n_real, "n_labelmap_cases": n_labelmap,
            "config": cfg.to_dict(),
        },
        "metrics": {f"final_{k}": v for k, v in last.items() if k not in ("iteration", "lr", "s_per_it")},
    }
    save_checkpoint(model, run_dir / "final", fields)
    return run_dir / "final"


def fit(cfg: TrainConfig, data_root: Path, run_dir: Path, *, fold: int | None = None, device: str = "cpu",
        num_threads: int | None = None, resume: bool = True, stop_after: int | None = None,
        time_budget: float | None = None) -> Path:
    """Train one network; returns the path stem of the final checkpoint (``run_dir/final``).

    ``fold`` leaves that fold's test subjects (every case of theirs, real or label map) out of
    training. ``stop_after`` stops (with a checkpoint) after that many iterations of this call.
    ``time_budget`` (seconds of training in this call) shortens the run to what fits: after
    :data:`BUDGET_PROBE_ITERATIONS` timed iterations the configured number of iterations is cut to
    :func:`budget_iterations` (the schedule is stretched over that count), and if the budget still
    runs out the run ends there; the manifest records the iterations done.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if num_threads:
        torch.set_num_threads(int(num_threads))
    dev = torch.device(device)
    protocol = load_protocol(cfg.protocol)
    cases = load_cases(data_root, cfg.folders, cfg.protocol)
    test_subjects: list[str] = []
    if fold is not None:
        folds = fold_split(cases, cfg.cv_folds, cfg.cv_seed)
        test_subjects = folds[fold]
        cases = [c for c in cases if c["subject"] not in test_subjects]
    real = [c for c in cases if c["kind"] == "real"]
    synth = [c for c in cases if c["kind"] != "real"]
    if not real and not synth:
        raise ValueError("no training cases")
    log.info("%s: %d real and %d label-map cases (fold %s, test subjects %s)", cfg.name, len(real), len(synth),
             fold, ", ".join(test_subjects) or "none")

    torch.manual_seed(cfg.seed)
    model = architecture_class(cfg.architecture)(**cfg.model).to(dev)
    if getattr(model, "config", {}).get("n_classes", len(protocol)) != len(protocol):
        raise ValueError(f"the model has {model.config['n_classes']} classes, protocol {protocol.name} {len(protocol)}")
    opt_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[cfg.optimizer]
    opt = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_fn = SegmentationLoss(cfg.ce_weight, cfg.dice_weight, cfg.dice)
    aug = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.augment.items()})
    lr_swap = torch.tensor(protocol.lr_swap(), dtype=torch.long)
    amp = dev.type == "cuda"

    start, history = 0, []
    if resume and (run_dir / "state.safetensors").is_file():
        start, history = load_state(run_dir, model, opt, gen)
        log.info("resumed %s at iteration %d", run_dir, start)
    elif cfg.init_from:
        source = Path(cfg.init_from.replace("{fold}", str(fold)))
        if not source.is_absolute():
            source = Path(data_root) / source
        initialise_from(model, source, protocol)
    config_path = run_dir / "config.toml"
    if not config_path.exists():
        import tomli_w

        with atomic_output(config_path) as tmp:
            Path(tmp).write_text(tomli_w.dumps({**cfg.to_dict(), "fold": -1 if fold is None else fold}))

    model.train()
    progress = _Progress(cfg, "train_dice", history)
    it = start
    while it < cfg.iterations:
        if stop_after is not None and progress.done >= stop_after:
            break
        if time_budget is not None and progress.done:
            elapsed = time.time() - progress.t0
            if progress.done == BUDGET_PROBE_ITERATIONS:
                cfg = replace(cfg, iterations=budget_iterations(start, progress.done, elapsed, time_budget,
                                                                cfg.iterations))
                progress.cfg = cfg
                log.info("%s: time budget %.0f s -> %d iterations in all", cfg.name, time_budget, cfg.iterations)
            elif elapsed > time_budget:
                log.warning("%s: time budget spent at iteration %d of %d", cfg.name, it, cfg.iterations)
                cfg = replace(cfg, iterations=it)
                progress.cfg = cfg
                break
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, it)
        images, targets = [], []
        for _ in range(cfg.batch_size):
            use_real = real and (not synth or float(torch.rand((), generator=gen)) < cfg.real_fraction)
            pool = real if use_real else synth
            case = pool[int(torch.randint(0, len(pool), (), generator=gen))]
            x, y = make_sample(case, aug, gen, lr_swap, device=dev)
            images.append(x)
            targets.append(y)
        x, y = torch.stack(images), torch.stack(targets)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        with torch.no_grad():
            dice = hard_dice(logits.argmax(1), y, len(protocol))[1:]
        progress.step(it, float(loss.detach()), float(torch.nanmean(dice)), opt.param_groups[0]["lr"])
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            save_state(run_dir, model, opt, gen, it, history, cfg)
    if it < cfg.iterations:
        save_state(run_dir, model, opt, gen, it, history, cfg)
        log.info("%s stopped at iteration %d of %d (resumable)", cfg.name, it, cfg.iterations)
        return run_dir / "state"

    return _save_final(model, run_dir, cfg, protocol, fold, it, test_subjects, cases, history,
                       n_real=len(real), n_labelmap=len(synth))


def fit_segnet(cfg: TrainConfig, data_root: Path, run_dir: Path, *, fold: int | None = None, device: str = "cpu",
               num_threads: int | None = None, resume: bool = True, stop_after: int | None = None) -> Path:
    """Train SegNet (a per-voxel patch network) on the real cases: class-balanced voxel batches.

    Each iteration draws ``batch_size`` voxels of one case: a class uniformly among those
    present, then a voxel of it (SegNet's paper samples voxels evenly across regions). Centroid
    distances come from the reference labels, with the network's own training noise and
    blanking (see :mod:`bids_app.models.segnet`). Intensity augmentation: a random gamma and
    scale per case visit.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if num_threads:
        torch.set_num_threads(int(num_threads))
    dev = torch.device(device)
    protocol = load_protocol(cfg.protocol)
    cases = [c for c in load_cases(data_root, cfg.folders, cfg.protocol) if c["kind"] == "real"]
    test_subjects: list[str] = []
    if fold is not None:
        test_subjects = fold_split(cases, cfg.cv_folds, cfg.cv_seed)[fold]
        cases = [c for c in cases if c["subject"] not in test_subjects]
    torch.manual_seed(cfg.seed)
    model = architecture_class(cfg.architecture)(**cfg.model).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, history = 0, []
    if resume and (run_dir / "state.safetensors").is_file():
        start, history = load_state(run_dir, model, opt, gen)
    prepared = []
    for case in cases:
        labels = case["classes"].long()
        coords = torch.nonzero(labels > 0)
        centroids, present = model.estimate_centroids(coords, labels[tuple(coords.T)])
        by_class = [torch.nonzero(labels == k) for k in range(len(protocol))]
        prepared.append((case, centroids, present, [v for v in by_class[1:] if len(v)] + [by_class[0][::50]]))
    model.train()
    progress = _Progress(cfg, "train_accuracy", history)
    it = start
    from bids_app.models.segnet import centroid_distances

    while it < cfg.iterations:
        if stop_after is not None and progress.done >= stop_after:
            break
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, it)
        case, centroids, present, pools = prepared[int(torch.randint(0, len(prepared), (), generator=gen))]
        gamma = float(torch.exp(torch.randn((), generator=gen) * 0.2))
        scale = float(1 + 0.1 * torch.randn((), generator=gen))
        volume = (case["image"][0].clamp(min=0) ** gamma * scale).to(dev)
        extractor = model.patch_extractor(volume)
        picks = torch.randint(0, len(pools), (cfg.batch_size,), generator=gen)
        coords = torch.stack([pools[p][int(torch.randint(0, len(pools[p]), (), generator=gen))] for p in picks.tolist()])
        target = case["classes"].long()[tuple(coords.T)].to(dev)
        batch = extractor(coords.to(dev))
        batch["centroids"] = centroid_distances(coords.to(dev), centroids.to(dev), present.to(dev))
        logits = model(batch)
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        progress.step(it, float(loss.detach()), float((logits.argmax(1) == target).float().mean()),
                      opt.param_groups[0]["lr"])
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            save_state(run_dir, model, opt, gen, it, history, cfg)
    if it < cfg.iterations:
        save_state(run_dir, model, opt, gen, it, history, cfg)
        return run_dir / "state"
    return _save_final(model, run_dir, cfg, protocol, fold, it, test_subjects, cases, history,
                       n_real=len(cases), n_labelmap=0)
