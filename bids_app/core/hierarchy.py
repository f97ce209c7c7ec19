"""Hierarchical fusion of a fine protocol's probabilities with a coarser protocol's.

The cortical parcellation (``dkt-aseg``, 93 classes) refines the whole-brain protocol (``aseg``):
every parcellation class has one parent structure (the merge table ``dkt-aseg_to_aseg.tsv``, e.g.
the 31 left cortical parcels -> Left-Cerebral-Cortex). Two ensembles that segment the same
structures at two granularities can then be combined in three steps, pure numpy:

1. :func:`pooled_parent_probabilities`: the parent protocol's probabilities of both ensembles
   (the fine one summed into its parents) averaged with one weight per network, so that every
   network of either ensemble counts the same in the parent structures.
2. :func:`hierarchical_probabilities`: the fine probabilities re-scaled, in place, so that the
   children of every parent sum to the parent's pooled probability while keeping the fine
   ensemble's split between them: ``q_c = (p_c + eps) / (sum_{c' in parent} p_c' + n_parent eps)
   * P_parent`` (``eps`` keeps the split uniform where the fine ensemble gives a parent no mass).
3. :func:`hierarchical_classes`: the fine labels taken top-down: the parent structure by the
   parent probabilities' argmax, then its most probable child. (A plain argmax over the fine
   classes would not agree with the parent labels where a parent's mass is split between
   several parcels: 0.3 + 0.3 of cortex loses to 0.4 of white matter.)

The labels of the two outputs then agree: the parcels of a structure cover exactly the voxels
the whole-brain segmentation gives that structure. The work runs in slabs along the first axis.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_SLAB = 8
#: added to every fine probability before the split (see the module docstring)
EPS = np.float32(1e-6)


def _check_parents(parent_of: np.ndarray, n_fine: int, n_parent: int) -> np.ndarray:
    parent_of = np.asarray(parent_of, dtype=np.int64)
    if parent_of.shape != (n_fine,):
        raise ValueError(f"parent_of has shape {parent_of.shape}, expected ({n_fine},)")
    if parent_of.min() < 0 or parent_of.max() >= n_parent:
        raise ValueError(f"parent_of holds positions outside 0..{n_parent - 1}")
    return parent_of


def sum_into_parents(fine: np.ndarray, parent_of: Sequence[int], n_parent: int) -> np.ndarray:
    """``(n_parent, ...)`` float32: the fine probabilities ``(K_fine, ...)`` summed into their parents."""
    parent_of = _check_parents(parent_of, fine.shape[0], n_parent)
    out = np.zeros((n_parent,) + fine.shape[1:], dtype=np.float32)
    for k, p in enumerate(parent_of):
        out[p] += fine[k]
    return out


def pooled_parent_probabilities(parent: np.ndarray, n_parent_models: int, fine: np.ndarray,
                                parent_of: Sequence[int], n_fine_models: int) -> np.ndarray:
    """Step 1: ``(K_parent, ...)`` float32, the network-weighted mean of ``parent`` (an ensemble of
    ``n_parent_models`` networks) and ``fine`` summed into its parents (``n_fine_models`` networks)."""
    if n_parent_models < 1 or n_fine_models < 1:
        raise ValueError(f"each ensemble needs at least one network, got {n_parent_models} and {n_fine_models}")
    if parent.shape[1:] != fine.shape[1:]:
        raise ValueError(f"the two ensembles' grids differ: {parent.shape[1:]} and {fine.shape[1:]}")
    pooled = sum_into_parents(fine, parent_of, parent.shape[0])
    pooled *= np.float32(n_fine_models)
    pooled += np.float32(n_parent_models) * parent.astype(np.float32, copy=False)
    pooled /= np.float32(n_parent_models + n_fine_models)
    return pooled


def hierarchical_probabilities(fine: np.ndarray, parent_of: Sequence[int], parent: np.ndarray) -> np.ndarray:
    """Step 2, **in place** on the float32 ``fine`` ``(K_fine, ...)``: every parent's children re-scaled
    to sum to ``parent`` ``(K_parent, ...)``, in the fine ensemble's proportions. Returns ``fine``."""
    if fine.dtype != np.float32:
        raise ValueError(f"fine probabilities must be float32 (they are changed in place), got {fine.dtype}")
    if parent.shape[1:] != fine.shape[1:]:
        raise ValueError(f"the grids differ: {fine.shape[1:]} and {parent.shape[1:]}")
    parent_of = _check_parents(parent_of, fine.shape[0], parent.shape[0])
    if fine.ndim < 2:
        raise ValueError(f"expected (K, ...) probabilities on a grid, got shape {fine.shape}")
    for start in range(0, fine.shape[1], _SLAB):
        sl = slice(start, min(start + _SLAB, fine.shape[1]))
        block = fine[:, sl]  # a view: scaling it changes fine
        block += EPS
        totals = np.zeros((parent.shape[0],) + block.shape[1:], dtype=np.float32)
        for k, p in enumerate(parent_of):
            totals[p] += block[k]
        scale = parent[:, sl].astype(np.float32) / np.maximum(totals, EPS)  # a parent without children: unused
        block *= scale[parent_of]
    return fine


def hierarchical_classes(fine: np.ndarray, parent_of: Sequence[int], parent: np.ndarray) -> np.ndarray:
    """Step 3: ``(...)`` int class positions of the fine protocol: each voxel's most probable child of
    its most probable parent (``parent.argmax(0)``); a parent without children falls back to the
    plain fine argmax."""
    if parent.shape[1:] != fine.shape[1:]:
        raise ValueError(f"the grids differ: {fine.shape[1:]} and {parent.shape[1:]}")
    parent_of = _check_parents(parent_of, fine.shape[0], parent.shape[0])
    has_children = np.bincount(parent_of, minlength=parent.shape[0]) > 0
    out = np.empty(fine.shape[1:], dtype=np.int64)
    for start in range(0, fine.shape[1], _SLAB):
        sl = slice(start, min(start + _SLAB, fine.shape[1]))
        chosen = parent[:, sl].argmax(axis=0)
        block = fine[:, sl]
        best = np.full(chosen.shape, -np.inf, dtype=np.float32)
        arg = block.argmax(axis=0)
        for k, p in enumerate(parent_of):
            better = (chosen == p) & (block[k] > best)
            best[better] = block[k][better]
            arg[better & has_children[chosen]] = k
        out[sl] = arg
    return out
