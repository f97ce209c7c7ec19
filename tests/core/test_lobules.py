import numpy as np
import pytest

from bids_app.core.labels import load_protocol
from bids_app.core.lobules import (constrained_fusion, lobule_tissue, mirror_lr, swap_sides, tissue_image,
                                   vermis_agreement, vote_counts)


def _affine_las(nx=8):
    # x from +3.5.. like the crop: LAS, centres at x = 3 - i  -> 3..-4 (asymmetric by one voxel)
    aff = np.diag([-1.0, 1.0, 1.0, 1.0])
    aff[0, 3] = 3.0
    return aff


def test_tissue_image_values_and_lobule_tissue():
    lab = np.zeros((4, 4, 4), np.int16)
    lab[0] = 1      # left I-II (cortex)
    lab[1] = 13     # left white matter
    lab[2] = 113    # right white matter
    cortex, wm = lobule_tissue(lab)
    assert cortex[0].all() and not cortex[1:].any()
    assert wm[1].all() and wm[2].all() and not wm[3].any()
    img = tissue_image(cortex, wm)
    assert img[0].max() == pytest.approx(0.5) and img[1].min() == pytest.approx(1.0) and img[3].max() == 0


def test_vote_counts_and_constrained_fusion_respect_regions_and_fill():
    a = np.zeros((6, 4, 4), np.int16)
    b = np.zeros_like(a)
    a[:3] = 1
    b[:2] = 2      # two atlases disagree on slice 2
    a[3:5] = 101
    b[3:5] = 101
    values = [1, 2, 101]
    votes = vote_counts([a, b], values)
    assert votes.shape == (3, 6, 4, 4)
    assert votes[0, 0, 0, 0] == 1 and votes[1, 0, 0, 0] == 1 and votes[2, 3, 0, 0] == 2
    regions = np.zeros(a.shape, np.uint8)
    regions[:3] = 1        # "left cortex": only labels 1, 2 allowed
    regions[3:] = 2        # "right cortex": only 101 (slice 5 has no vote: filled from the nearest)
    out = constrained_fusion(votes, values, {1: [1, 2], 2: [101]}, regions)
    assert set(np.unique(out[:3])) <= {1, 2}
    assert (out[2] == 1).all()              # only atlas a votes there
    assert (out[3:] == 101).all()           # slice 5 filled from slice 4
    assert (out[regions == 0] == 0).all()


def test_mirror_lr_maps_x_to_minus_x_through_the_affine():
    aff = _affine_las()
    data = np.zeros((8, 2, 2), np.float32)
    data[0] = 1.0   # x = 3
    data[7] = 2.0   # x = -4 has no mirror on this grid
    out = mirror_lr(data, aff)
    assert (out[6] == 1.0).all()           # x = -3
    assert (out[7] == 0).all() and out.sum() == 4.0
    with pytest.raises(ValueError):
        mirror_lr(data, np.diag([1.0, 1.0, 1.0, 1.0]) + np.array([[0, 0, 0, 0.3], [0] * 4, [0] * 4, [0] * 4]))


def test_swap_sides_swaps_left_and_right_lobules():
    lab = np.array([0, 1, 13, 101, 113, 6], np.int16)
    assert swap_sides(lab).tolist() == [0, 101, 113, 1, 13, 106]
    p = load_protocol("lobules")
    assert len(p) == 27


def test_vermis_agreement_folds_lobules_to_groups():
    manual = np.zeros((3, 4, 4), np.int32)
    manual[0] = 630
    manual[1] = 631
    manual[2] = 632
    lob = np.zeros_like(manual, dtype=np.int16)
    lob[0] = 3          # IV -> I-V group
    lob[1, :2] = 106    # right Crus I -> VI-VII group
    lob[1, 2:] = 9      # VIIIA: wrong group for half of slice 1
    lob[2] = 111        # IX -> VIII-X
    agree = vermis_agreement(lob, manual)
    assert agree["Vermis-I-V"] == pytest.approx(1.0)
    assert agree["Vermis-VI-VII"] == pytest.approx(2 * 8 / (16 + 8))
    assert agree["Vermis-VIII-X"] == pytest.approx(2 * 16 / (16 + 24))
