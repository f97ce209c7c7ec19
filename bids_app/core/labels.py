"""Label protocols (BIDS ``dseg.tsv`` tables) and the tables that map one protocol onto another.

A *protocol* is a BIDS ``dseg.tsv`` in ``bids_app/data/protocols/<name>_dseg.tsv``: ``index`` is
the value written in label images (the FreeSurfer value where one exists), the row order is the
class order of the networks. A *mapping* is ``mappings/<source>_to_<target>.tsv`` with the columns
``source`` and ``target``: ``target`` is one label of the target protocol, or several separated by
``|``, in which case each voxel gets the one carried by the nearest voxel that has one of them
(for labels that do not say which hemisphere they are in). A merge from a fine protocol to a
coarse one is such a table; nothing about a protocol is hard-coded elsewhere.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import numpy as np

log = logging.getLogger(__name__)

PROTOCOLS_DIR = Path(__file__).resolve().parent.parent / "data" / "protocols"


class ProtocolError(ValueError):
    """A protocol or mapping table is missing or malformed."""


@dataclass(frozen=True)
class Protocol:
    """One label protocol: label values, names, abbreviations and colours in class order."""

    name: str
    indices: tuple[int, ...]
    names: tuple[str, ...]
    abbreviations: tuple[str, ...] = ()
    colors: tuple[str, ...] = ()
    _position: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(set(self.indices)) != len(self.indices):
            raise ProtocolError(f"protocol {self.name}: label indices are not unique")
        self._position.update({v: i for i, v in enumerate(self.indices)})

    def __len__(self) -> int:
        return len(self.indices)

    def position(self, index: int) -> int:
        """Class position (network channel) of a label value."""
        try:
            return self._position[int(index)]
        except KeyError:
            raise ProtocolError(f"label {index} is not in protocol {self.name}") from None

    def name_of(self, index: int) -> str:
        return self.names[self.position(index)]

    def to_classes(self, labels: np.ndarray) -> np.ndarray:
        """Label values -> class positions (uint8/uint16); values outside the protocol raise."""
        labels = np.asarray(labels)
        values = np.unique(labels)
        unknown = [int(v) for v in values if int(v) not in self._position]
        if unknown:
            raise ProtocolError(f"labels {unknown[:10]} are not in protocol {self.name}")
        lut = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.uint16)
        for v in values:
            lut[int(v)] = self._position[int(v)]
        out = lut[labels.astype(np.int64)]
        return out.astype(np.uint8) if len(self) <= 256 else out

    def to_labels(self, classes: np.ndarray) -> np.ndarray:
        """Class positions -> label values (int16; FreeSurfer values fit)."""
        return np.asarray(self.indices, dtype=np.int16)[np.asarray(classes, dtype=np.int64)]

    def lr_swap(self) -> list[int]:
        """Class position of the mirrored structure of every class (identity for midline ones)."""
        swap = list(range(len(self)))
        by_name = {n: i for i, n in enumerate(self.names)}
        pairs = (("Left-", "Right-"), ("ctx-lh-", "ctx-rh-"), ("left-", "right-"))
        for i, name in enumerate(self.names):
            for left, right in pairs:
                for a, b in ((left, right), (right, left)):
                    if name.startswith(a) and b + name[len(a):] in by_name:
                        swap[i] = by_name[b + name[len(a):]]
        return swap

    def as_manifest(self) -> dict:
        """The ``label_protocol`` object of a model manifest."""
        return {
            "name": self.name,
            "labels": [{"index": int(i), "name": n} for i, n in zip(self.indices, self.names)],
            "lr_swap": self.lr_swap(),
        }

    def to_tsv_rows(self) -> list[dict]:
        rows = []
        for k, (i, n) in enumerate(zip(self.indices, self.names)):
            row = {"index": int(i), "name": n}
            if self.abbreviations:
                row["abbreviation"] = self.abbreviations[k]
            if self.colors:
                row["color"] = self.colors[k]
            rows.append(row)
        return rows


def _read_tsv(path: Path) -> list[dict]:
    if not path.is_file():
        raise ProtocolError(f"{path}: no such table")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def read_protocol(path: str | Path, name: str | None = None) -> Protocol:
    """Read a BIDS ``dseg.tsv`` (columns ``index`` and ``name``, optional ``abbreviation``/``color``)."""
    path = Path(path)
    rows = _read_tsv(path)
    if not rows or "index" not in rows[0] or "name" not in rows[0]:
        raise ProtocolError(f"{path}: a dseg.tsv needs 'index' and 'name' columns")
    try:
        indices = tuple(int(r["index"]) for r in rows)
    except ValueError:
        raise ProtocolError(f"{path}: 'index' must be integers") from None
    name = name or path.name.replace("_dseg.tsv", "")
    return Protocol(
        name=name,
        indices=indices,
        names=tuple(r["name"] for r in rows),
        abbreviations=tuple(r.get("abbreviation") or r["name"] for r in rows),
        colors=tuple(r.get("color") or "" for r in rows),
    )


@lru_cache(maxsize=None)
def load_protocol(name: str) -> Protocol:
    """A protocol shipped with ArborSeg: ``aseg``, ``dkt-aseg``, ``cerebrum7``, ``deep14``..."""
    path = PROTOCOLS_DIR / f"{name}_dseg.tsv"
    if not path.is_file():
        known = sorted(p.name.replace("_dseg.tsv", "") for p in PROTOCOLS_DIR.glob("*_dseg.tsv"))
        raise ProtocolError(f"unknown label protocol {name!r} (known: {', '.join(known)})")
    return read_protocol(path, name)


@dataclass(frozen=True)
class LabelMapping:
    """``source`` label value -> target value, or candidates resolved by nearest voxel."""

    source: str
    target: str
    table: Mapping[int, tuple[int, ...]]

    @property
    def is_merge(self) -> bool:
        """True when every source label maps to exactly one target label."""
        return all(len(t) == 1 for t in self.table.values())


@lru_cache(maxsize=None)
def load_mapping(source: str, target: str) -> LabelMapping:
    """The table ``mappings/<source>_to_<target>.tsv``."""
    path = PROTOCOLS_DIR / "mappings" / f"{source}_to_{target}.tsv"
    if not path.is_file():
        known = sorted(p.stem for p in (PROTOCOLS_DIR / "mappings").glob("*.tsv"))
        raise ProtocolError(f"no label mapping from {source!r} to {target!r} (known: {', '.join(known)})")
    table: dict[int, tuple[int, ...]] = {}
    for row in _read_tsv(path):
        try:
            src = int(row["source"])
            tgt = tuple(int(t) for t in row["target"].split("|"))
        except (KeyError, ValueError):
            raise ProtocolError(f"{path}: bad row {row}") from None
        if src in table:
            raise ProtocolError(f"{path}: source label {src} listed twice")
        table[src] = tgt
    return LabelMapping(source, target, table)


def map_labels(labels: np.ndarray, mapping: LabelMapping, *, unknown: str = "error") -> np.ndarray:
    """Apply a mapping table to a label image (int32 out).

    Labels missing from the table raise ``ProtocolError`` (``unknown="error"``) or become 0
    with a warning (``unknown="zero"``). Candidate targets (``a|b``) are resolved to the target
    label of the nearest voxel that was mapped to one of the candidates directly.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    values = np.unique(labels).astype(np.int64)
    missing = [int(v) for v in values if int(v) not in mapping.table]
    if missing:
        if unknown == "error":
            raise ProtocolError(f"labels {missing[:12]} have no row in {mapping.source}_to_{mapping.target}")
        log.warning("labels %s are not in %s_to_%s; set to 0", missing[:12], mapping.source, mapping.target)
    out = np.zeros(labels.shape, dtype=np.int32)
    pending: dict[tuple[int, ...], list[int]] = {}
    for v in values:
        tgt = mapping.table.get(int(v), (0,))
        if len(tgt) == 1:
            out[labels == v] = tgt[0]
        else:
            pending.setdefault(tgt, []).append(int(v))
    for candidates, sources in pending.items():
        todo = np.isin(labels, sources)
        seeds = np.isin(out, candidates)
        if not seeds.any():
            log.warning("no voxel carries any of %s; %d voxels set to 0", candidates, int(todo.sum()))
            continue
        # index of the nearest seed voxel for every voxel (only read where todo)
        _, nearest = ndimage.distance_transform_edt(~seeds, return_indices=True)
        out[todo] = out[tuple(ix[todo] for ix in nearest)]
    return out


def merge_probabilities(probs: np.ndarray, fine: Protocol, coarse: Protocol,
                        mapping: LabelMapping) -> np.ndarray:
    """Sum class probabilities ``(K_fine, ...)`` into ``(K_coarse, ...)`` through a merge table."""
    if not mapping.is_merge:
        raise ProtocolError(f"{mapping.source}_to_{mapping.target} is not a plain merge table")
    if probs.shape[0] != len(fine):
        raise ProtocolError(f"{probs.shape[0]} channels for protocol {fine.name} of {len(fine)} classes")
    out = np.zeros((len(coarse),) + probs.shape[1:], dtype=probs.dtype)
    for k, value in enumerate(fine.indices):
        target = mapping.table.get(int(value))
        if target is None:
            raise ProtocolError(f"label {value} of {fine.name} has no row in {mapping.source}_to_{mapping.target}")
        out[coarse.position(target[0])] += probs[k]
    return out


def class_merge_matrix(fine: Protocol, coarse: Protocol, mapping: LabelMapping) -> np.ndarray:
    """``(K_fine,)`` array: the coarse class position of every fine class."""
    return np.array([coarse.position(mapping.table[int(v)][0]) for v in fine.indices], dtype=np.int64)


def merge_labels(labels: np.ndarray, fine: Protocol, coarse: Protocol) -> np.ndarray:
    """Label image of ``fine`` -> label image of ``coarse`` via ``<fine>_to_<coarse>.tsv``,
    following a chain of tables when there is no direct one (e.g. dkt-aseg -> aseg -> deep14)."""
    chain = merge_chain(fine.name, coarse.name)
    out = np.asarray(labels)
    for src, dst in zip(chain[:-1], chain[1:]):
        out = map_labels(out, load_mapping(src, dst))
    return out


def merge_chain(fine: str, coarse: str) -> list[str]:
    """Protocol names from ``fine`` to ``coarse`` through the merge tables (breadth-first)."""
    if fine == coarse:
        return [fine]
    edges: dict[str, list[str]] = {}
    for path in (PROTOCOLS_DIR / "mappings").glob("*_to_*.tsv"):
        src, dst = path.stem.split("_to_")
        edges.setdefault(src, []).append(dst)
    frontier, seen = [[fine]], {fine}
    while frontier:
        nxt = []
        for chain in frontier:
            for dst in sorted(edges.get(chain[-1], [])):
                if dst == coarse:
                    return chain + [dst]
                if dst not in seen:
                    seen.add(dst)
                    nxt.append(chain + [dst])
        frontier = nxt
    raise ProtocolError(f"no chain of mapping tables from {fine!r} to {coarse!r}")


def merged_probabilities(probs: np.ndarray, fine: Protocol, coarse: Protocol) -> np.ndarray:
    """:func:`merge_probabilities` along :func:`merge_chain`."""
    chain = merge_chain(fine.name, coarse.name)
    out, current = probs, fine
    for dst in chain[1:]:
        nxt = load_protocol(dst)
        out = merge_probabilities(out, current, nxt, load_mapping(current.name, dst))
        current = nxt
    return out


def volumes_ml(classes: np.ndarray, n_classes: int, voxel_volume_mm3: float) -> np.ndarray:
    """Volume (mL) of every class position of a class image."""
    counts = np.bincount(np.asarray(classes, dtype=np.int64).ravel(), minlength=n_classes)[:n_classes]
    return counts * float(voxel_volume_mm3) / 1000.0


def asymmetry_index(left: float, right: float) -> float:
    """``(L - R) / ((L + R) / 2)``; NaN when both are zero."""
    total = left + right
    return float("nan") if total == 0 else float((left - right) / (total / 2.0))


def protocol_families(protocol: Protocol) -> dict[str, list[int]]:
    """Group class positions into families for plots: cortex, deep GM, ventricles/CSF, WM, cerebellum, brainstem."""
    families: dict[str, list[int]] = {}
    for k, name in enumerate(protocol.names):
        if k == 0 and name == "background":
            continue
        low = name.lower()
        if low.startswith("ctx-") or "cortex" in low and "cerebellum" not in low or low == "grey-matter":
            fam = "cortex"
        elif "cerebellum" in low:
            fam = "cerebellum"
        elif "white" in low or "ventraldc" in low:
            fam = "white-matter"
        elif "vent" in low or low == "csf":
            fam = "ventricles-csf"
        elif "stem" in low:
            fam = "brainstem"
        else:
            fam = "deep-grey-matter"
        families.setdefault(fam, []).append(k)
    return families


def lateral_pairs(protocol: Protocol) -> list[tuple[int, int, str]]:
    """``(left position, right position, structure name)`` for every mirrored pair."""
    swap = protocol.lr_swap()
    pairs = []
    for i, j in enumerate(swap):
        name = protocol.names[i]
        if i < j and (name.startswith("Left-") or name.startswith("ctx-lh-") or name.startswith("left-")):
            base = name.replace("Left-", "").replace("ctx-lh-", "ctx-").replace("left-", "")
            pairs.append((i, j, base))
    return pairs
