"""BIDS input discovery (pybids) and BIDS-Derivatives naming and writing.

Input side: :func:`load_layout` and :func:`collect_anatomical` turn a BIDS dataset plus the user's
selection into one :class:`AnatInputs` per subject/session. Output side: :func:`derivative_path`
builds names from entities with ArborSeg's own path patterns, and :func:`atomic_write_bytes`
and friends make every file appear in one rename.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_output
from .errors import DatasetError

LOGGER = logging.getLogger(__name__)

#: Path patterns for every derivative ArborSeg writes (pybids ``build_path`` syntax). pybids' own
#: derivatives configuration has no pattern for transforms, morphometry tables or reportlets.
_ANAT = "sub-{subject}[/ses-{session}]/{datatype<anat>|anat}/sub-{subject}[_ses-{session}]"
_ACQ = "[_acq-{acquisition}][_ce-{ceagent}][_rec-{reconstruction}][_run-{run}]"
PATH_PATTERNS: tuple[str, ...] = (
    _ANAT + _ACQ + "[_space-{space}][_res-{res}][_desc-{desc}]"
    "_{suffix<T1w|T2w|FLAIR|PD>}{extension<.nii|.nii.gz|.json>|.nii.gz}",
    _ANAT + _ACQ + "[_space-{space}][_res-{res}][_label-{label}][_desc-{desc}]"
    "_{suffix<mask>}{extension<.nii|.nii.gz|.json>|.nii.gz}",
    _ANAT + _ACQ + "[_space-{space}][_res-{res}][_seg-{segmentation}][_label-{label}][_desc-{desc}]"
    "_{suffix<dseg|probseg|morph|uncertainty|qc>}{extension<.nii|.nii.gz|.json|.tsv>|.nii.gz}",
    _ANAT + _ACQ + "_from-{from}_to-{to}_mode-{mode<image|points>|image}[_desc-{desc}]"
    "_{suffix<xfm>}{extension<.mat|.h5|.txt|.json>|.mat}",
    "sub-{subject}/{datatype<figures>}/sub-{subject}[_ses-{session}]" + _ACQ +
    "[_space-{space}][_seg-{segmentation}][_desc-{desc}]_{suffix<T1w|T2w|FLAIR|mask|dseg|xfm|uncertainty>}"
    "{extension<.svg|.png|.html>|.svg}",
)

#: ``seg-<label>`` entity of the derivatives of each label protocol (others: the name without punctuation)
SEG_ENTITIES: dict[str, str] = {"aseg": "wholebrain", "dkt-aseg": "dkt", "cerebrum7": "cerebrum7", "deep14": "deep14"}


def seg_entity(protocol: str) -> str:
    """The ``seg-<label>`` of a protocol's derivatives: ``aseg`` -> ``wholebrain``, ``dkt-aseg`` -> ``dkt``..."""
    return SEG_ENTITIES.get(protocol, re.sub(r"[^0-9a-zA-Z]", "", protocol))


#: Suffixes ArborSeg accepts as anatomical inputs, and which one drives the pipeline.
ANAT_SUFFIXES = ("T1w", "T2w", "FLAIR")


@dataclass(frozen=True)
class AnatInputs:
    """The anatomical images of one subject (and session) selected for processing."""

    subject: str
    session: str | None
    t1w: Path | None
    t2w: Path | None = None
    flair: Path | None = None
    #: other candidate T1w images that were found but not used, with the reason
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        """``sub-01`` or ``sub-01_ses-A``: used in file names, logs and the summary."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def workflow_name(self) -> str:
        """A Nipype-safe identifier for this subject/session's workflow."""
        return re.sub(r"[^0-9a-zA-Z]", "_", self.label) + "_wf"


def strip_prefix(labels: Iterable[str] | None, prefix: str) -> tuple[str, ...]:
    """Accept ``sub-01`` and ``01`` alike (fMRIPrep convention); keep order, drop duplicates."""
    out: list[str] = []
    for raw in labels or ():
        for item in str(raw).split(","):
            item = item.strip()
            if item.startswith(prefix):
                item = item[len(prefix):]
            if item and item not in out:
                out.append(item)
    return tuple(out)


def load_bids_filters(path: Path | None) -> dict[str, dict[str, Any]]:
    """Read a ``--bids-filter-file``: ``{"t1w": {"acquisition": "mprage"}, ...}``."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the BIDS filter file ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: the BIDS filter file is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: the BIDS filter file must hold a JSON object keyed by t1w, t2w, flair")
    unknown = sorted(set(data) - {s.lower() for s in ANAT_SUFFIXES})
    if unknown:
        raise DatasetError(f"{path}: unknown keys {unknown} in the BIDS filter file (use t1w, t2w, flair)")
    for key, value in data.items():
        if not isinstance(value, dict):
            raise DatasetError(f"{path}: the filter for {key!r} must be a JSON object of BIDS entities")
    return data


def check_bids_root(bids_dir: Path) -> None:
    """Fail with one line when ``bids_dir`` is obviously not a BIDS dataset."""
    if not bids_dir.exists():
        raise DatasetError(f"{bids_dir}: the BIDS directory does not exist")
    if not bids_dir.is_dir():
        raise DatasetError(f"{bids_dir}: not a directory, expected a BIDS dataset")
    desc = bids_dir / "dataset_description.json"
    if not desc.is_file():
        raise DatasetError(f"{bids_dir}: not a BIDS dataset (dataset_description.json is missing)")
    try:
        json.loads(desc.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{desc}: dataset_description.json is not readable JSON ({exc})") from None
    if not any(p.is_dir() for p in bids_dir.glob("sub-*")):
        raise DatasetError(f"{bids_dir}: not a BIDS dataset (no sub-* folders)")


def load_layout(bids_dir: Path, *, validate: bool = True, database_path: Path | None = None):
    """Index a raw BIDS dataset with pybids; never writes into the dataset."""
    from bids import BIDSLayout, BIDSLayoutIndexer
    from bids.exceptions import BIDSValidationError

    check_bids_root(bids_dir)
    try:
        # derivatives, sourcedata and code are not inputs; keep pybids out of them
        indexer = BIDSLayoutIndexer(
            validate=validate,
            ignore=["derivatives", "sourcedata", "code", "stimuli", "models", re.compile(r"/\.")],
        )
        return BIDSLayout(
            str(bids_dir),
            validate=validate,
            derivatives=False,
            database_path=str(database_path) if database_path else None,
            indexer=indexer,
        )
    except BIDSValidationError as exc:
        raise DatasetError(f"{bids_dir}: not a valid BIDS dataset ({str(exc).splitlines()[0]})") from None


def _voxel_volume(path: Path) -> float:
    import nibabel as nb

    try:
        zooms = nb.load(str(path)).header.get_zooms()[:3]
        return float(zooms[0] * zooms[1] * zooms[2])
    except Exception:  # unreadable files are reported later, by the image checks
        return float("inf")


def _pick(files: list[Path], kind: str, label: str) -> tuple[Path | None, list[str]]:
    """Choose one image when there are several runs or acquisitions (documented in the README).

    The rule: the finest voxel volume wins (more detail survives conforming), ties go to the
    highest run number, then to the name order. The choice and the others are logged.
    """
    if not files:
        return None, []
    if len(files) == 1:
        return files[0], []
    from bids.layout import parse_file_entities

    def key(path: Path):
        run = parse_file_entities(str(path)).get("run") or 0
        return (_voxel_volume(path), -int(run), path.name)

    ranked = sorted(files, key=key)
    chosen = ranked[0]
    note = (
        f"{label}: {len(files)} {kind} images found; using {chosen.name} (finest voxel size, then "
        f"highest run); not used: {', '.join(p.name for p in ranked[1:])}"
    )
    LOGGER.info(note)
    return chosen, [note]


def collect_anatomical(
    layout,
    *,
    participant_label: Iterable[str] = (),
    session_label: Iterable[str] = (),
    bids_filters: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[AnatInputs]:
    """One :class:`AnatInputs` per selected subject/session (``t1w`` is ``None`` when missing).

    Raises :class:`DatasetError` for labels that do not exist in the dataset.
    """
    bids_filters = bids_filters or {}
    all_subjects = sorted(layout.get_subjects())
    subjects = list(strip_prefix(participant_label, "sub-")) or all_subjects
    unknown = [s for s in subjects if s not in all_subjects]
    if unknown:
        raise DatasetError(
            f"{layout.root}: participant label(s) not found: {', '.join('sub-' + s for s in unknown)} "
            f"(available: {', '.join(all_subjects) or 'none'})"
        )
    wanted_sessions = strip_prefix(session_label, "ses-")
    if wanted_sessions:
        all_sessions = set(layout.get_sessions(subject=subjects))
        missing = [s for s in wanted_sessions if s not in all_sessions]
        if missing:
            raise DatasetError(
                f"{layout.root}: session label(s) not found for the selected participants: "
                f"{', '.join('ses-' + s for s in missing)} (available: {', '.join(sorted(all_sessions)) or 'none'})"
            )

    selected: list[AnatInputs] = []
    for subject in subjects:
        sessions = layout.get_sessions(subject=subject) or [None]
        if wanted_sessions:
            sessions = [s for s in sessions if s in wanted_sessions]
        for session in sessions:
            found: dict[str, Path | None] = {}
            notes: list[str] = []
            label = f"sub-{subject}" + (f"_ses-{session}" if session else "")
            for suffix in ANAT_SUFFIXES:
                query: dict[str, Any] = {
                    "subject": subject,
                    "datatype": "anat",
                    "suffix": suffix,
                    "extension": [".nii", ".nii.gz"],
                    "return_type": "file",
                }
                if session:
                    query["session"] = session
                query.update(bids_filters.get(suffix.lower(), {}))
                files = [Path(f) for f in layout.get(**query)]
                chosen, more = _pick(files, suffix, label)
                found[suffix] = chosen
                notes.extend(more)
            selected.append(
                AnatInputs(
                    subject=subject,
                    session=session,
                    t1w=found["T1w"],
                    t2w=found["T2w"],
                    flair=found["FLAIR"],
                    notes=tuple(notes),
                )
            )
    return selected


# --------------------------------------------------------------------------- output side
def derivative_path(entities: Mapping[str, Any]) -> str:
    """The relative derivative path for ``entities`` (raises ``ValueError`` if no pattern fits)."""
    from bids.layout.writing import build_path

    path = build_path(dict(entities), list(PATH_PATTERNS), strict=False)
    if not path:
        raise ValueError(f"no ArborSeg derivative pattern matches entities {dict(entities)}")
    return path


def source_entities(source_file: str | Path) -> dict[str, Any]:
    """BIDS entities of a raw file that carry over to its derivatives."""
    from bids.layout import parse_file_entities

    ents = parse_file_entities(str(source_file))
    keep = ("subject", "session", "acquisition", "ceagent", "reconstruction", "run")
    return {k: ents[k] for k in keep if k in ents}


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole file."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_copy(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` via a temporary file in the destination folder and one rename."""
    import shutil

    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def write_dataset_description(output_dir: Path, *, bids_dir: Path, version: str) -> Path:
    """``dataset_description.json`` of the derivatives (DatasetType derivative, GeneratedBy)."""
    container = {"Type": "docker", "Tag": f"arborseg/arborseg:{version}"} if os.getenv("ARBORSEG_CONTAINER") else None
    generated = {
        "Name": "ArborSeg",
        "Version": version,
        "CodeURL": "https://github.com/arborseg/arborseg",
        "Description": "Preprocessing and segmentation of anatomical MRI",
    }
    if container:
        generated["Container"] = container
    desc = {
        "Name": "ArborSeg derivatives",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "DatasetLinks": {"raw": Path(bids_dir).resolve().as_uri()},
        "HowToAcknowledge": "Cite the references in logs/CITATION.md",
    }
    return atomic_write_json(Path(output_dir) / "dataset_description.json", desc)


def raw_uri(path: Path, bids_dir: Path) -> str:
    """A BIDS URI for an input file, relative to the raw dataset (``bids:raw:sub-01/anat/...``)."""
    try:
        rel = Path(path).resolve().relative_to(Path(bids_dir).resolve())
    except ValueError:
        return Path(path).resolve().as_uri()
    return f"bids:raw:{rel.as_posix()}"
