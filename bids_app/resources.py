"""Resolving TemplateFlow templates, offline first, with one clear error when a file is missing."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ResourceError

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class TemplateFiles:
    """The files of one TemplateFlow template that preprocessing needs."""

    name: str
    #: whole-head T1w: the affine registration target
    target: Path
    #: 1 mm T1w (brain) defining the template-space output grid
    reference: Path
    #: 1 mm brain mask: the prior of the intracranial mask and the registration-quality region
    brain_mask: Path


def templateflow_home(explicit: str | Path | None = None) -> Path:
    """``--templateflow-home``, else ``$TEMPLATEFLOW_HOME``, else TemplateFlow's default cache."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.getenv("TEMPLATEFLOW_HOME"):
        return Path(os.environ["TEMPLATEFLOW_HOME"]).expanduser().resolve()
    return Path.home() / ".cache" / "templateflow"


def _find(home: Path, template: str, candidates: list[dict]) -> Path | None:
    """The first existing file among TemplateFlow-named candidates (no network)."""
    folder = home / f"tpl-{template}"
    for ents in candidates:
        parts = [f"tpl-{template}"]
        for key in ("res", "desc"):
            if ents.get(key) is not None:
                parts.append(f"{key}-{ents[key]}")
        name = "_".join(parts) + f"_{ents['suffix']}.nii.gz"
        path = folder / name
        if path.is_file() and path.stat().st_size > 0:
            return path
    return None


def resolve_template(template: str, *, home: str | Path | None = None, registration_resolution: int = 2) -> TemplateFiles:
    """Find the template files under the TemplateFlow home; download them when they are missing.

    Looks for the files by their TemplateFlow names first (works offline and on read-only
    folders). Only when one is missing is the TemplateFlow client asked to fetch it; without
    network this ends in a :class:`ResourceError` that names the folder and the missing file.
    """
    root = templateflow_home(home)
    res = f"{int(registration_resolution):02d}"
    wanted = {
        "target": [{"res": res, "suffix": "T1w"}, {"res": "01", "suffix": "T1w"}, {"res": "1", "suffix": "T1w"}],
        "reference": [{"res": "01", "desc": "brain", "suffix": "T1w"}, {"res": "01", "suffix": "T1w"},
                      {"res": "1", "desc": "brain", "suffix": "T1w"}],
        "brain_mask": [{"res": "01", "desc": "brain", "suffix": "mask"}, {"res": "1", "desc": "brain", "suffix": "mask"}],
    }
    found: dict[str, Path] = {}
    for role, candidates in wanted.items():
        path = _find(root, template, candidates)
        if path is None:
            path = _download(template, root, candidates[0])
        if path is None:
            first = candidates[0]
            name = f"tpl-{template}_res-{first['res']}" + (f"_desc-{first['desc']}" if first.get("desc") else "")
            raise ResourceError(
                f"template {template}: {name}_{first['suffix']}.nii.gz is not in TEMPLATEFLOW_HOME={root} and could "
                f"not be downloaded; set TEMPLATEFLOW_HOME (or --templateflow-home) to a folder holding "
                f"tpl-{template}/ (fetch it where there is internet with: python -c \"import templateflow.api as t; "
                f"t.get('{template}')\")"
            )
        found[role] = path
    LOGGER.info("template %s: target %s, reference %s", template, found["target"].name, found["reference"].name)
    return TemplateFiles(name=template, **found)


def _download(template: str, root: Path, ents: dict) -> Path | None:
    """Ask the TemplateFlow client for one file; ``None`` when that fails (offline, unknown template)."""
    if os.getenv("ARBORSEG_OFFLINE", "0") == "1":
        return None
    os.environ.setdefault("TEMPLATEFLOW_HOME", str(root))
    try:
        import templateflow.api as tf

        query = {"resolution": int(ents["res"]), "suffix": ents["suffix"], "desc": ents.get("desc"),
                 "extension": ".nii.gz"}
        result = tf.get(template, raise_empty=False, **query)
    except Exception as exc:  # network errors, read-only home, unknown template
        LOGGER.debug("TemplateFlow could not provide %s %s: %s", template, ents, exc)
        return None
    paths = [Path(p) for p in (result if isinstance(result, list) else [result])]
    paths = [p for p in paths if p.is_file() and p.stat().st_size > 0]
    return paths[0] if len(paths) == 1 else None
