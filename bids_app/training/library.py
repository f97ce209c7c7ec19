"""Build the labelled cerebellum library (``arborseg-build-library``), the way DeepCERES built its
training library with CERES, from the data ArborSeg may use.

For every OASIS-TRT-20 subject (skull-stripped T1w + manual cerebellar cortex / white-matter labels
and manual vermis lobule groups):

1. the T1w is normalised (99th percentile inside the brain = 1, as the pipeline does), registered
   affinely to the MNI152NLin6Asym 1 mm brain (ANTs, estimated on 2 mm copies), resampled to the
   template grid and cut to the cerebellum crop (:data:`bids_app.core.crop.CEREBELLUM_BOX_MM`);
   the manual labels and the aparcNMMjt+aseg labels follow (nearest neighbour);
2. each of the five manual Park 2014 lobule maps (0.3 mm, labels only: the images were never
   published) is turned into a tissue image (cortex 0.5, white matter 1.0) and registered to the
   subject's tissue image made the same way from its manual cerebellar labels (ANTs affine + SyN,
   mean squares); its labels are warped with ANTs' ``genericLabel`` interpolation;
3. the five propagated maps are fused by a smoothed majority vote *constrained to the subject's
   manual tissue*: manual left cortex may only take left cortical lobules, right cortex right ones,
   the vermis either side's, manual white matter the white-matter label of its side; a voxel without
   votes takes the label of the nearest voxel that has one. The fused labels cover the manual
   cerebellum exactly;
4. the case and its left-right mirrored copy (labels swapped) are written on the crop grid, with a
   ``full`` label map (aparcNMMjt+aseg with the lobules embedded as 10000 + lobule, clear of the
   cortical parcels 1002-2035) for synthetic (domain-randomised) training images.

The manual vermis groups (630 = I-V, 631 = VI-VII, 632 = VIII-X) are *not* used to build the
labels, so their Dice with the fused labels folded to the same groups is an independent check;
it is written to ``vermis_agreement.tsv`` and ``library.json``. The Diedrichsen 2009 atlas is not
used: its protocol (I-IV merged, vermis apart) does not match Park's, and the five Park maps already
give every subject a five-atlas vote.

These are silver labels: automatic propagation of five manual maps, constrained by manual tissue.
The library is written to a folder the user chooses and is never part of the package.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_to_output

from bids_app.atomic import atomic_output
from bids_app.core.crop import CEREBELLUM_BOX_MM, crop_box
from bids_app.core.files import save_atomic
from bids_app.core.images import to_ants
from bids_app.core.intensity import normalise_intensity
from bids_app.core.labels import load_mapping, load_protocol, map_labels
from bids_app.core.lobules import (constrained_fusion, lobule_tissue, mirror_lr, swap_sides, tissue_image,
                                   vermis_agreement, vote_counts)
from bids_app.core.registration import apply_transform, register_affine

log = logging.getLogger(__name__)

FORMAT = "arborseg-cerebellum-library"
#: 2: lobules embedded in ``full`` at 10000 + lobule (version 1 used 1000 + lobule, which collided with the
#: DKT cortical labels 1002-1035, and blanked the cortex of the mirrored copies); see :func:`upgrade_library`
FORMAT_VERSION = 2
#: manual labels of the OASIS-TRT-20 ``desc-manualvermis`` maps
MANUAL = {"left_cortex": (6,), "right_cortex": (45,), "vermis": (630, 631, 632), "left_wm": (7,), "right_wm": (46,)}
#: where the lobules sit in the ``full`` map (they replace the FreeSurfer cerebellum labels there); above every
#: aparcNMMjt+aseg label and within int16
FULL_LOBULE_OFFSET = 10000
V1_LOBULE_OFFSET = 1000


@dataclass
class ParkAtlas:
    name: str
    tissue: object  # ANTsImage, 1 mm, the atlas' own space
    labels: object  # ANTsImage, 0.3 mm lobule labels (float, for genericLabel interpolation)


def load_park_atlas(path: Path, *, margin_vox: int = 10) -> ParkAtlas:
    """One Park 2014 map: lobule labels (``park2014_to_lobules``) cut to their box, and its 1 mm tissue image."""
    img = nib.load(str(path))
    raw = np.asarray(img.dataobj)
    # the box first (the maps are ~180 M voxels, mostly background), then the label table
    nonzero = [np.flatnonzero(raw.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    if any(n.size == 0 for n in nonzero):
        raise ValueError(f"{path}: no lobule labels")
    lo = np.maximum([n[0] - margin_vox for n in nonzero], 0)
    hi = np.minimum([n[-1] + 1 + margin_vox for n in nonzero], raw.shape)
    raw = raw[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.int32)
    labels = map_labels(raw, load_mapping("park2014", "lobules"), unknown="zero")
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ lo + img.affine[:3, 3]
    zoom = float(np.mean(img.header.get_zooms()[:3]))
    cortex, wm = lobule_tissue(labels)
    tissue = tissue_image(cortex, wm, sigma_vox=0.4 / zoom)
    import ants

    tissue_1mm = ants.resample_image(to_ants(nib.Nifti1Image(tissue, affine)), (1.0, 1.0, 1.0), False, 0)
    return ParkAtlas(Path(path).name.split("_")[0], tissue_1mm,
                     to_ants(nib.Nifti1Image(labels.astype(np.float32), affine)))


def subject_to_crop(t1w_path: Path, manual_path: Path, full_path: Path, template_path: Path, *,
                    random_seed: int = 42) -> dict:
    """The subject's normalised T1w, manual labels and aparc+aseg labels on the cerebellum crop grid."""
    t1 = nib.load(str(t1w_path))
    data = np.asarray(t1.dataobj, dtype=np.float32)
    t1n = nib.Nifti1Image(normalise_intensity(data, data > 0), t1.affine)
    template = nib.load(str(template_path))
    # the affine is estimated on 2 mm copies (10x faster, the same transform to the millimetre)
    transform = register_affine(resample_to_output(t1n, 2.0, order=1), resample_to_output(template, 2.0, order=1),
                                random_seed=random_seed)
    out = {"t1w": crop_box(apply_transform(transform, t1n, template))}
    for key, path in (("manual", manual_path), ("full", full_path)):
        lab = nib.load(str(path))
        moving = nib.Nifti1Image(np.asarray(lab.dataobj).astype(np.float32), lab.affine)
        warped = apply_transform(transform, moving, template, interpolation="nearestneighbor")
        out[key] = np.rint(np.asarray(crop_box(warped).dataobj)).astype(np.int32)
    out["affine"] = out["t1w"].affine
    out["t1w"] = np.asarray(out["t1w"].dataobj, dtype=np.float32)
    return out


def manual_regions(manual: np.ndarray) -> tuple[np.ndarray, dict[int, list[int]]]:
    """Region image of the manual cerebellum and the lobule values allowed in each region."""
    protocol = load_protocol("lobules")
    left = [v for v, n in zip(protocol.indices, protocol.names) if n.startswith("Left-")]
    right = [v for v, n in zip(protocol.indices, protocol.names) if n.startswith("Right-")]
    lwm = [v for v, n in zip(protocol.indices, protocol.names) if n.startswith("Left-") and n.endswith("White-Matter")]
    rwm = [v for v, n in zip(protocol.indices, protocol.names) if n.startswith("Right-") and n.endswith("White-Matter")]
    lctx = [v for v in left if v not in lwm]
    rctx = [v for v in right if v not in rwm]
    regions = np.zeros(manual.shape, dtype=np.uint8)
    allowed = {}
    for r, (key, values) in enumerate((("left_cortex", lctx), ("right_cortex", rctx), ("vermis", lctx + rctx),
                                       ("left_wm", lwm), ("right_wm", rwm)), start=1):
        regions[np.isin(manual, MANUAL[key])] = r
        allowed[r] = values
    return regions, allowed


def propagate(atlas: ParkAtlas, fixed, *, random_seed: int = 42) -> tuple[np.ndarray, float]:
    """Register one Park map's tissue image onto the subject's (ANTs affine + SyN, mean squares) and
    warp its labels (``genericLabel``). Returns the labels on the fixed grid and the tissue Dice."""
    import ants

    config = getattr(ants, "config", None)
    previous = getattr(config, "_random_seed", None)
    if config is not None:
        config._random_seed = int(random_seed)
    try:
        reg = ants.registration(fixed=fixed, moving=atlas.tissue, type_of_transform="SyN",
                                aff_metric="meansquares", syn_metric="meansquares", random_seed=int(random_seed))
        warped = ants.apply_transforms(fixed=fixed, moving=atlas.labels, transformlist=reg["fwdtransforms"],
                                       interpolator="genericLabel")
    finally:
        if config is not None:
            config._random_seed = previous
        for path in (*reg["fwdtransforms"], *reg["invtransforms"]) if "reg" in locals() else ():
            Path(path).unlink(missing_ok=True)
    moved = reg["warpedmovout"].numpy() > 0.25
    target = fixed.numpy() > 0.25
    dice = float(2 * (moved & target).sum() / max(1, moved.sum() + target.sum()))
    return np.rint(warped.numpy()).astype(np.int16), dice


def fuse_subject(propagated: list[np.ndarray], manual: np.ndarray, *, sigma_vox: float = 1.0) -> np.ndarray:
    """Constrained, smoothed majority vote of the propagated lobule maps (see the module docstring)."""
    protocol = load_protocol("lobules")
    values = [v for v in protocol.indices if v]
    votes = vote_counts(propagated, values, sigma_vox=sigma_vox)
    regions, allowed = manual_regions(manual)
    return constrained_fusion(votes, values, allowed, regions)


def embed_lobules(full: np.ndarray, lobules: np.ndarray) -> np.ndarray:
    """The aparc+aseg label map with the lobules written in as ``FULL_LOBULE_OFFSET + lobule`` (for synthesis)."""
    out = np.asarray(full, dtype=np.int32).copy()
    out[lobules > 0] = FULL_LOBULE_OFFSET + lobules[lobules > 0]
    return out


def _write_case(out_dir: Path, case: str, t1w: np.ndarray, lobules: np.ndarray, full: np.ndarray,
                affine: np.ndarray) -> dict:
    files = {"t1w": f"{case}_T1w.nii.gz", "dseg": f"{case}_dseg.nii.gz", "full": f"{case}_desc-full_dseg.nii.gz"}
    save_atomic(nib.Nifti1Image(t1w.astype(np.float32), affine), out_dir / files["t1w"])
    save_atomic(nib.Nifti1Image(lobules.astype(np.int16), affine), out_dir / files["dseg"])
    save_atomic(nib.Nifti1Image(full.astype(np.int16), affine), out_dir / files["full"])
    return files


def _write_json(path: Path, payload: dict) -> None:
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=1) + "\n")


def _write_agreement(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    lines = ["\t".join(keys)] + ["\t".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys)
                                 for r in rows]
    with atomic_output(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


def build_library(out_dir: Path, *, oasis_dir: Path, park_dir: Path, template: Path,
                  subjects: list[str] | None = None, mirror: bool = True, random_seed: int = 42) -> dict:
    """Build (or resume) the library in ``out_dir``; returns the content of ``library.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    park_paths = sorted(Path(park_dir).glob("brain*_labels.nii*"))
    if not park_paths:
        raise FileNotFoundError(f"{park_dir}: no Park 2014 maps (brain<N>_labels.nii.gz)")
    if not Path(template).is_file():
        raise FileNotFoundError(f"{template}: template T1w not found")
    subject_dirs = sorted(p for p in Path(oasis_dir).glob("sub-*") if p.is_dir())
    if subjects:
        subject_dirs = [p for p in subject_dirs if p.name in subjects or p.name[4:] in subjects]
    if not subject_dirs:
        raise FileNotFoundError(f"{oasis_dir}: no OASIS-TRT-20 subject folders (sub-*)")
    index_path = out_dir / "library.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if index and index.get("format") != FORMAT:
        raise ValueError(f"{index_path}: not an ArborSeg cerebellum library")
    done = {c["case"] for c in index.get("cases", [])}
    index.update({
        "format": FORMAT, "format_version": FORMAT_VERSION, "space": "MNI152NLin6Asym",
        "box_mm": [list(b) for b in CEREBELLUM_BOX_MM], "voxel_size_mm": 1.0, "protocol": "lobules",
        "intensity": "T1w / 99th percentile inside the brain (the pipeline's normalisation), affine to MNI152NLin6Asym",
        "labels": "silver: five manual Park 2014 maps propagated by ANTs SyN on tissue images, fused by a "
                  "smoothed majority vote constrained to the subject's manual cerebellar cortex and white matter",
        "sources": {"images": "OASIS-TRT-20 (Mindboggle-101), CC BY-NC-SA 3.0",
                    "lobules": "Park et al. 2014 manual maps (CoBrALab/atlases), CC BY-NC-SA 4.0",
                    "template": str(Path(template).name)},
        "licence": "CC BY-NC-SA 4.0 (derived from CC BY-NC-SA data)",
        "park_maps": [p.name for p in park_paths],
    })
    index.setdefault("cases", [])
    agreement = index.setdefault("vermis_agreement", [])
    atlases: list[ParkAtlas] | None = None
    for i, sub in enumerate(subject_dirs, 1):
        label = sub.name
        case = f"oasis-{label}"
        if case in done and (not mirror or f"{case}-mirror" in done):
            log.info("[%d/%d] %s already in the library", i, len(subject_dirs), case)
            continue
        if atlases is None:
            t0 = time.time()
            atlases = [load_park_atlas(p) for p in park_paths]
            log.info("loaded %d Park 2014 maps in %.0f s", len(atlases), time.time() - t0)
        t0 = time.time()
        crop = subject_to_crop(sub / f"{label}_desc-brain_T1w.nii.gz", sub / f"{label}_desc-manualvermis_dseg.nii.gz",
                               sub / f"{label}_desc-aparcNMMjt+aseg_dseg.mgz", template, random_seed=random_seed)
        manual = crop["manual"]
        cortex = np.isin(manual, MANUAL["left_cortex"] + MANUAL["right_cortex"] + MANUAL["vermis"])
        wm = np.isin(manual, MANUAL["left_wm"] + MANUAL["right_wm"])
        fixed = to_ants(nib.Nifti1Image(tissue_image(cortex, wm), crop["affine"]))
        propagated, dices = [], []
        for atlas in atlases:
            labels, dice = propagate(atlas, fixed, random_seed=random_seed)
            propagated.append(labels)
            dices.append(dice)
        lobules = fuse_subject(propagated, manual)
        row = {"case": case, **vermis_agreement(lobules, manual),
               "single_atlas_mean": float(np.mean([np.nanmean(list(vermis_agreement(p, manual).values()))
                                                   for p in propagated])),
               "tissue_dice_mean": float(np.mean(dices))}
        agreement[:] = [r for r in agreement if r["case"] != case] + [row]
        subject = f"OASIS-TRT-20-{int(label[4:])}"
        entries = [(case, False, crop["t1w"], lobules, embed_lobules(crop["full"], lobules))]
        if mirror:
            m_lob = swap_sides(mirror_lr(lobules, crop["affine"]))
            m_full = embed_lobules(mirror_lr(crop["full"], crop["affine"]), m_lob)
            entries.append((f"{case}-mirror", True, mirror_lr(crop["t1w"], crop["affine"]), m_lob, m_full))
        for name, mirrored, t1w, lob, full in entries:
            files = _write_case(out_dir, name, t1w, lob, full, crop["affine"])
            index["cases"] = [c for c in index["cases"] if c["case"] != name] + [
                {"case": name, "subject": subject, "mirrored": mirrored, "kind": "real", **files}]
        index["shape"] = list(crop["t1w"].shape)
        index["affine"] = np.asarray(crop["affine"]).round(6).tolist()
        _write_json(index_path, index)
        _write_agreement(out_dir / "vermis_agreement.tsv", agreement)
        log.info("[%d/%d] %s: vermis Dice %s (single atlas %.3f), tissue Dice %.3f, %.0f s", i, len(subject_dirs),
                 case, ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("Vermis")),
                 row["single_atlas_mean"], row["tissue_dice_mean"], time.time() - t0)
    if agreement:
        keys = [k for k in agreement[0] if k != "case"]
        index["vermis_agreement_mean"] = {k: float(np.nanmean([r[k] for r in agreement])) for k in keys}
        _write_json(index_path, index)
    return index


def read_index(library_dir: Path, *, need_full_maps: bool = False) -> dict:
    """``library.json`` of a built library; with ``need_full_maps`` (synthetic training images), a
    library older than version 2 is refused with the command that upgrades it."""
    path = Path(library_dir) / "library.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (build the library with arborseg-build-library)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: not an ArborSeg cerebellum library")
    version = index.get("format_version")
    if need_full_maps and version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r}; its full label maps overlap lobules and cortical "
                         f"parcels. Upgrade it in place: arborseg-build-library {library_dir} --upgrade")
    return index


def upgrade_full_maps(full: np.ndarray, lobules: np.ndarray, partner_full: np.ndarray | None,
                      affine: np.ndarray) -> np.ndarray:
    """A version-1 case's ``full`` map as version 2 writes it.

    Version 1 wrote the lobules over the map as 1000 + lobule and left every other voxel as it was, so
    outside the lobules the map is intact and the lobules are in ``lobules``. A mirrored case (give
    the ``full`` map of the case it mirrors as ``partner_full``) additionally lost every label >= 1000
    (the cortex); it is rebuilt from the partner's map, mirrored, as version 2 builds it.
    """
    full = np.asarray(full, dtype=np.int32)
    lobules = np.asarray(lobules)
    base = full if partner_full is None else mirror_lr(np.asarray(partner_full, dtype=np.int32), affine)
    return embed_lobules(base, lobules)


def upgrade_library(library_dir: Path) -> dict:
    """Rewrite a version-1 library's ``full`` maps in place as version 2 (seconds, instead of a rebuild).

    Only the ``full`` maps change (they feed synthetic training images); the T1w and lobule maps, and
    so the atlas prior, are the same in both versions. Every map is rewritten from the version-1 files
    before any is replaced, and ``library.json`` is updated last, so a stopped upgrade can be run again.
    """
    library_dir = Path(library_dir)
    index_path = library_dir / "library.json"
    index = read_index(library_dir)
    version = index.get("format_version")
    if version == FORMAT_VERSION:
        log.info("%s is already format version %d", library_dir, FORMAT_VERSION)
        return index
    if version != 1:
        raise ValueError(f"{index_path}: format_version {version!r} cannot be upgraded (only 1 -> {FORMAT_VERSION})")
    cases = {c["case"]: c for c in index["cases"]}
    affine = np.asarray(index["affine"], dtype=float)

    def load(case: dict, key: str) -> nib.Nifti1Image:
        return nib.load(str(library_dir / case[key]))

    new = {}
    for name, case in cases.items():
        full_img = load(case, "full")
        partner = None
        if case.get("mirrored"):
            source = name.removesuffix("-mirror")
            if source not in cases:
                raise ValueError(f"{index_path}: mirrored case {name} has no unmirrored case {source} to rebuild from")
            partner = np.asarray(load(cases[source], "full").dataobj)
        new[name] = (upgrade_full_maps(np.asarray(full_img.dataobj), np.asarray(load(case, "dseg").dataobj),
                                       partner, affine), full_img.affine)
    for name, (data, case_affine) in new.items():
        save_atomic(nib.Nifti1Image(data.astype(np.int16), case_affine), library_dir / cases[name]["full"])
    index["format_version"] = FORMAT_VERSION
    index["upgraded_from"] = version
    _write_json(index_path, index)
    log.info("%s: %d full label maps rewritten (format version %d -> %d)", library_dir, len(new), version,
             FORMAT_VERSION)
    return index


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    from bids_app.cli.parser import env_path

    parser = argparse.ArgumentParser(
        prog="arborseg-build-library",
        description="Build the labelled cerebellum library (lobules of the Park 2014 protocol for the OASIS-TRT-20 "
                    "subjects, in the MNI cerebellum crop) used for the atlas prior and for training.")
    parser.add_argument("out_dir", type=Path, help="folder to write the library to (created; resumable)")
    parser.add_argument("--oasis", type=Path, help="OASIS-TRT-20 folder (sub-*/...)")
    parser.add_argument("--park", type=Path, help="folder of the Park 2014 maps (brain<N>_labels)")
    parser.add_argument("--upgrade", action="store_true",
                        help="rewrite a library built by an older ArborSeg in the current format (in place, seconds; "
                             "--oasis and --park are then not needed)")
    parser.add_argument("--templateflow-home", type=Path, default=env_path("TEMPLATEFLOW_HOME"),
                        help="TemplateFlow folder holding tpl-MNI152NLin6Asym (default: $TEMPLATEFLOW_HOME)")
    parser.add_argument("--subjects", nargs="+", help="only these subjects (e.g. sub-01 02)")
    parser.add_argument("--no-mirror", action="store_true", help="do not add left-right mirrored copies")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--nthreads", type=int, default=None, help="ANTs threads (default: all cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.nthreads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.nthreads)
    if args.upgrade:
        try:
            upgrade_library(args.out_dir)
        except (FileNotFoundError, ValueError) as exc:
            log.error("%s", exc)
            return 2
        return 0
    if args.oasis is None or args.park is None:
        parser.error("give --oasis and --park (or --upgrade for an existing library)")
    if args.templateflow_home is None:
        parser.error("give --templateflow-home or set TEMPLATEFLOW_HOME")
    template = Path(args.templateflow_home) / "tpl-MNI152NLin6Asym" / "tpl-MNI152NLin6Asym_res-01_desc-brain_T1w.nii.gz"
    try:
        index = build_library(args.out_dir, oasis_dir=args.oasis, park_dir=args.park, template=template,
                              subjects=args.subjects, mirror=not args.no_mirror, random_seed=args.seed)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    log.info("library %s: %d cases; vermis agreement %s", args.out_dir, len(index["cases"]),
             index.get("vermis_agreement_mean"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
