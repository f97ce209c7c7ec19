"""External resources (templates, atlases): one manifest, one lookup order, one clear error.

Every file ArborSeg reads from outside the package is listed in ``bids_app/data/resources.json``
with its upstream URL and sha256. Each is looked for, in this order, in

1. the folder given on the command line (``--templateflow-home`` / ``--atlas-dir``),
2. the folder named by the environment (``$TEMPLATEFLOW_HOME`` / ``$ARBORSEG_ATLAS_DIR``),
3. the resource cache (``--cache-dir`` / ``$ARBORSEG_CACHE_DIR``, else ``<work-dir>/cache``; the
   container image ships a pre-filled, read-only cache), and
4. downloaded into the cache when there is network (never with ``--offline``/``$ARBORSEG_OFFLINE=1``).

A file is used only when its sha256 (of the uncompressed bytes) matches. Nothing is ever written
to ``$HOME``. With a resource nowhere to be found, :func:`require` raises one
:class:`~bids_app.errors.ResourceError` naming the resource, the places searched and how to
provide it, before any work starts.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from pathlib import Path

from .atomic import atomic_output
from .errors import ResourceError

LOGGER = logging.getLogger(__name__)

#: per group: (command-line flag, environment variable, sub-folder of the cache)
GROUPS = {
    "templateflow": ("--templateflow-home", "TEMPLATEFLOW_HOME", "templateflow"),
    "atlas": ("--atlas-dir", "ARBORSEG_ATLAS_DIR", "atlases"),
}
DOWNLOAD_TIMEOUT_S = 60
#: the ``needed_by`` stages the pipeline runs today (the cerebellum stages list their atlases ahead)
PIPELINE_STAGES = frozenset({"preprocessing"})


@dataclass(frozen=True)
class Resource:
    """One external file, as the manifest lists it."""

    id: str
    group: str
    path: str
    url: str
    sha256: str
    role: str = ""
    needed_by: str = ""
    bytes: int | None = None
    licence: str = ""
    citation: str = ""
    #: ``auto``: downloaded when missing; ``manual``: the user provides it (``how`` says how)
    fetch: str = "auto"
    how: str = ""


@dataclass(frozen=True)
class Places:
    """Where resources are looked for: explicit folders, then the environment, then the cache."""

    templateflow_home: Path | None = None
    atlas_dir: Path | None = None
    cache_dir: Path | None = None
    offline: bool = False
    #: read from the environment when ``None`` (tests pass an explicit mapping)
    environ: dict[str, str] | None = field(default=None, compare=False)

    def candidates(self, group: str) -> list[tuple[str, Path]]:
        """``(origin, folder)`` pairs in lookup order for one group."""
        flag, env_var, sub = GROUPS[group]
        env = os.environ if self.environ is None else self.environ
        explicit = self.templateflow_home if group == "templateflow" else self.atlas_dir
        found: list[tuple[str, Path]] = []
        if explicit:
            found.append((flag, Path(explicit).expanduser()))
        if env.get(env_var):
            found.append((f"${env_var}", Path(env[env_var]).expanduser()))
        for origin, cache in self.caches():
            found.append((origin, cache / sub))
        if group == "templateflow":  # read only: TemplateFlow's own default cache, when a user has one
            default = Path(env.get("HOME", "/nonexistent")) / ".cache" / "templateflow"
            if default.is_dir():
                found.append(("TemplateFlow's default home", default))
        unique: list[tuple[str, Path]] = []
        for origin, folder in found:
            if all(folder != f for _, f in unique):
                unique.append((origin, folder))
        return unique

    @property
    def is_offline(self) -> bool:
        env = os.environ if self.environ is None else self.environ
        return self.offline or env.get("ARBORSEG_OFFLINE", "0") == "1"

    def caches(self) -> list[tuple[str, Path]]:
        env = os.environ if self.environ is None else self.environ
        caches = []
        if self.cache_dir:
            caches.append(("cache", Path(self.cache_dir).expanduser()))
        if env.get("ARBORSEG_CACHE_DIR"):
            caches.append(("$ARBORSEG_CACHE_DIR", Path(env["ARBORSEG_CACHE_DIR"]).expanduser()))
        return caches

    def download_root(self, group: str) -> Path | None:
        """The first cache folder that can be written (``None``: nowhere to download to)."""
        for _origin, cache in self.caches():
            folder = cache / GROUPS[group][2]
            if _writable(folder):
                return folder
        return None


@dataclass
class Status:
    """What :func:`locate` found for one resource."""

    resource: Resource
    path: Path | None = None
    origin: str = ""
    #: ``ok`` | ``mismatch`` (found, wrong digest) | ``missing`` | ``downloaded``
    state: str = "missing"
    searched: list[Path] = field(default_factory=list)
    detail: str = ""

    @property
    def usable(self) -> bool:
        return self.state in ("ok", "downloaded") or (self.state == "mismatch" and self.resource.fetch == "manual")


def _writable(folder: Path) -> bool:
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def load_manifest(path: str | Path | None = None) -> list[Resource]:
    """The resources of the package manifest (or of ``path``)."""
    if path is None:
        text = importlib_resources.files("bids_app").joinpath("data", "resources.json").read_text()
    else:
        text = Path(path).read_text()
    data = json.loads(text)
    return [Resource(**entry) for entry in data["resources"]]


def content_sha256(path: str | Path) -> str:
    """sha256 of the file's bytes, gunzipped first when it is gzip-compressed."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as raw:
        magic = raw.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def locate(resource: Resource, places: Places, *, download: bool = True) -> Status:
    """Find one resource, verify it, and download it into the cache when allowed and missing."""
    status = Status(resource)
    for origin, folder in places.candidates(resource.group):
        path = folder / resource.path
        status.searched.append(path)
        if not path.is_file():
            continue
        try:
            digest = content_sha256(path)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            status.detail = f"{path}: unreadable ({exc})"
            continue
        if digest == resource.sha256:
            status.path, status.origin, status.state = path, origin, "ok"
            return status
        status.detail = f"{path}: sha256 {digest[:12]}… differs from the manifest's {resource.sha256[:12]}…"
        if resource.fetch == "manual":  # a user's own conversion: used, with a warning
            status.path, status.origin, status.state = path, origin, "mismatch"
            return status
    if not download or places.is_offline or resource.fetch != "auto":
        return status
    root = places.download_root(resource.group)
    if root is None:
        status.detail = status.detail or "no writable cache folder to download into"
        return status
    try:
        status.path = fetch(resource, root / resource.path)
        status.origin, status.state = f"downloaded into {root}", "downloaded"
    except ResourceError as exc:
        status.detail = str(exc)
    return status


def fetch(resource: Resource, dest: Path, *, source: str | None = None) -> Path:
    """Download ``resource`` (or copy it from ``source``, a URL or a local file) to ``dest``.

    Written atomically; ``.nii`` sources become ``.nii.gz`` when ``dest`` asks for it; kept only
    when the sha256 matches the manifest.
    """
    source = source or resource.url
    with atomic_output(dest) as tmp:  # removed, not renamed, when the digest check raises
        with open(tmp, "wb") as out:
            if "://" in source:
                try:
                    with urllib.request.urlopen(source, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310
                        _copy(response, out, gzip_it=_needs_gzip(source, dest))
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    code = getattr(exc, "code", None)
                    reason = f"HTTP {code} {exc.reason}" if code else getattr(exc, "reason", exc)
                    raise ResourceError(f"resource {resource.id}: download from {source} failed ({reason})") from None
            else:
                with open(source, "rb") as src:
                    _copy(src, out, gzip_it=_needs_gzip(source, dest))
        digest = content_sha256(tmp)
        if digest != resource.sha256:
            raise ResourceError(f"resource {resource.id}: {source} has sha256 {digest}, the manifest expects "
                                f"{resource.sha256}; not used")
    LOGGER.info("resource %s: %s -> %s", resource.id, source, dest)
    return dest


def _needs_gzip(source: str, dest: Path) -> bool:
    return dest.name.endswith(".gz") and not source.split("?")[0].endswith(".gz")


def _copy(src, out, *, gzip_it: bool) -> None:
    if gzip_it:
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
            shutil.copyfileobj(src, gz, 1 << 20)
    else:
        shutil.copyfileobj(src, out, 1 << 20)


def how_to_provide(resource: Resource) -> str:
    flag, env_var, sub = GROUPS[resource.group]
    base = (f"give {flag} DIR or set ${env_var} to a folder holding {resource.path}, or pre-fill a cache with "
            f"'arborseg-resources fetch --cache-dir DIR' where there is internet and pass --cache-dir DIR "
            f"(it looks in DIR/{sub}/)")
    if resource.fetch == "manual":
        return f"{resource.how}; then {base}"
    return f"{base}; source: {resource.url}"


def require(needed_by: set[str], places: Places, *, manifest: list[Resource] | None = None) -> dict[str, Path]:
    """Locate every resource needed by the given stages; one :class:`ResourceError` for the first missing one."""
    found: dict[str, Path] = {}
    for resource in manifest if manifest is not None else load_manifest():
        if resource.needed_by not in needed_by:
            continue
        status = locate(resource, places)
        if not status.usable:
            searched = ", ".join(str(p.parent) for p in status.searched) or "nowhere (no folder configured)"
            why = f" ({status.detail})" if status.detail else ""
            offline = " Downloads are off (--offline / ARBORSEG_OFFLINE=1)." if places.is_offline else ""
            raise ResourceError(f"resource {resource.id} ({resource.role}) is not available: {resource.path} was "
                                f"not found in {searched}{why}.{offline} To provide it: {how_to_provide(resource)}")
        if status.state == "mismatch":
            LOGGER.warning("resource %s: %s", resource.id, status.detail)
        found[resource.id] = status.path
    return found


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


#: the manifest entries that make up a template (role -> resource id)
MANIFEST_TEMPLATES = {
    "MNI152NLin6Asym": {"target": "MNI152NLin6Asym-T1w-2mm", "reference": "MNI152NLin6Asym-T1w-brain-1mm",
                        "brain_mask": "MNI152NLin6Asym-brain-mask-1mm"},
}


def resolve_template(template: str, *, places: Places | None = None, home: str | Path | None = None,
                     registration_resolution: int = 2) -> TemplateFiles:
    """The registration target, reference grid and brain mask of ``template``.

    Templates of the manifest (MNI152NLin6Asym) are located and verified by sha256 through
    :func:`require`. Any other TemplateFlow template (``--template``) is looked up by its
    TemplateFlow file names in the same folders, without a digest to check.
    """
    places = places or Places(templateflow_home=Path(home) if home else None)
    if template in MANIFEST_TEMPLATES and int(registration_resolution) == 2:
        ids = MANIFEST_TEMPLATES[template]
        manifest = [r for r in load_manifest() if r.id in ids.values()]
        found = require({r.needed_by for r in manifest}, places, manifest=manifest)
        files = TemplateFiles(name=template, **{role: found[rid] for role, rid in ids.items()})
    else:
        files = _resolve_by_name(template, places, registration_resolution)
    LOGGER.info("template %s: target %s, reference %s", template, files.target, files.reference.name)
    return files


def _resolve_by_name(template: str, places: Places, registration_resolution: int) -> TemplateFiles:
    res = f"{int(registration_resolution):02d}"
    wanted = {
        "target": [f"res-{res}_T1w", "res-01_T1w", "res-1_T1w"],
        "reference": ["res-01_desc-brain_T1w", "res-01_T1w", "res-1_desc-brain_T1w"],
        "brain_mask": ["res-01_desc-brain_mask", "res-1_desc-brain_mask"],
    }
    folders = [folder / f"tpl-{template}" for _origin, folder in places.candidates("templateflow")]
    found: dict[str, Path] = {}
    for role, stems in wanted.items():
        for folder in folders:
            hits = [folder / f"tpl-{template}_{stem}.nii.gz" for stem in stems]
            hit = next((p for p in hits if p.is_file() and p.stat().st_size > 0), None)
            if hit:
                found[role] = hit
                break
        else:
            searched = ", ".join(str(f) for f in folders) or "nowhere (no TemplateFlow folder configured)"
            raise ResourceError(
                f"template {template}: tpl-{template}_{stems[0]}.nii.gz was not found in {searched}; set "
                f"TEMPLATEFLOW_HOME (or --templateflow-home) to a folder holding tpl-{template}/ (fetch it where "
                f"there is internet with: python -c \"import templateflow.api as t; t.get('{template}')\")")
    return TemplateFiles(name=template, **found)


def places_from_config(config) -> Places:
    """The lookup places of a :class:`~bids_app.config.RunConfig`."""
    return Places(templateflow_home=config.templateflow_home, atlas_dir=config.atlas_dir,
                  cache_dir=config.cache_dir, offline=config.offline)
