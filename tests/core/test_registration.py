"""Tests of affine registration and resampling (bids_app.core.registration)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
from scipy import ndimage as ndi

from bids_app.core import images, registration

N = 48
VS = 2.0
SHIFT = np.array([4.0, -3.0, 5.0])  # mm (RAS)
ANGLES_DEG = (4.0, -3.0, 5.0)


def _rotation(ax, ay, az) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _head(world: np.ndarray) -> np.ndarray:
    """Piecewise-constant head: scalp, brain, a brighter core, two asymmetric blobs, a 'cerebellum'."""
    x, y, z = world.T

    def ell(c, r):
        return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1

    v = np.zeros(len(x), np.float32)
    v[ell((0, 0, 0), (36, 42, 38))] = 40
    v[ell((0, 0, 0), (32, 38, 34))] = 70
    v[ell((0, 5, 5), (26, 30, 26))] = 110
    v[ell((-10, -6, 0), (6, 10, 8))] = 20
    v[ell((12, -4, -4), (8, 8, 12))] = 150
    v[ell((0, -28, -18), (14, 8, 7))] = 90
    return v


def _make_pair():
    affine = np.diag([VS, VS, VS, 1.0])
    affine[:3, 3] = -VS * (N - 1) / 2
    world = np.indices((N, N, N)).reshape(3, -1).T * VS + affine[:3, 3]
    rot = _rotation(*ANGLES_DEG)
    fixed = ndi.gaussian_filter(_head(world).reshape(N, N, N), 1.0)
    # the moving head is the fixed one rotated by rot and shifted by SHIFT: moving(p) = fixed(rot^T (p - SHIFT))
    moving = ndi.gaussian_filter(_head((world - SHIFT) @ rot).reshape(N, N, N), 1.0)
    fixed_img = images.new_image(fixed.astype(np.float32), affine)
    moving_img = images.new_image(moving.astype(np.float32), affine)
    return fixed_img, moving_img, rot


@pytest.fixture(scope="module")
def pair():
    return _make_pair()


@pytest.fixture(scope="module")
def registered(pair, tmp_path_factory):
    """The registration, run with Python's temp folder pointed at an empty folder."""
    fixed, moving, _rot = pair
    tmp = tmp_path_factory.mktemp("ants_tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(tmp))
        tx = registration.register_affine(moving, fixed, random_seed=1)
    return tx, sorted(p.name for p in tmp.iterdir())


@pytest.fixture(scope="module")
def transform(registered):
    return registered[0]


def test_register_affine_leaves_no_temp_files(registered):
    assert registered[1] == []


def _ncc(a, b) -> float:
    return registration.normalised_cross_correlation(np.asarray(a.dataobj), np.asarray(b.dataobj))


def test_register_affine_recovers_motion(pair, transform):
    fixed, moving, rot = pair
    before = _ncc(fixed, moving)
    warped = registration.apply_transform(transform, moving, fixed)
    assert warped.shape == fixed.shape
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-5)
    after = _ncc(fixed, warped)
    assert after > 0.95
    assert after > before + 0.03
    # the transform maps a fixed-space point to where it is in the moving image (ANTs: LPS)
    lps = np.array([-1.0, -1.0, 1.0])
    for p in ([0.0, 0.0, 0.0], [20.0, -10.0, 15.0]):
        p = np.asarray(p)
        expected = rot @ p + SHIFT
        got = np.asarray(transform.apply_to_point(tuple(p * lps))) * lps
        assert np.linalg.norm(got - expected) < 1.0


def test_apply_transform_inverse_maps_back(pair, transform):
    fixed, moving, _rot = pair
    back = registration.apply_transform(transform, fixed, moving, invert=True)
    assert _ncc(moving, back) > 0.95
    assert _ncc(moving, back) > _ncc(moving, fixed) + 0.03
    # nearest-neighbour keeps the set of labels
    labels = images.like(fixed, (np.asarray(fixed.dataobj) > 60).astype(np.float32))
    nn = registration.apply_transform(transform, labels, moving, interpolation="nearestNeighbor", invert=True)
    assert set(np.unique(np.asarray(nn.dataobj)).tolist()) <= {0.0, 1.0}


def test_write_read_transform_roundtrip(tmp_path, pair, transform):
    fixed, moving, _rot = pair
    path = registration.write_transform(transform, tmp_path / "xfm.mat")
    assert path == tmp_path / "xfm.mat" and path.stat().st_size > 0
    again = registration.read_transform(path)
    np.testing.assert_allclose(again.parameters, transform.parameters, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(again.fixed_parameters, transform.fixed_parameters, atol=1e-6)
    a = np.asarray(registration.apply_transform(transform, moving, fixed).dataobj)
    b = np.asarray(registration.apply_transform(again, moving, fixed).dataobj)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_ncc_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 20, 20))
    b = rng.normal(size=(20, 20, 20))
    assert registration.normalised_cross_correlation(a, a) == pytest.approx(1.0)
    assert registration.normalised_cross_correlation(a, 3 * a + 7) == pytest.approx(1.0)
    assert registration.normalised_cross_correlation(a, -a) == pytest.approx(-1.0)
    assert abs(registration.normalised_cross_correlation(a, b)) < 0.05
    assert registration.normalised_cross_correlation(a, np.ones_like(a)) == 0.0
    # the mask selects where the correlation is computed
    mask = np.zeros(a.shape, bool)
    mask[:10] = True
    c = np.where(mask, a, b)
    assert registration.normalised_cross_correlation(a, c, mask) == pytest.approx(1.0)
    assert registration.normalised_cross_correlation(a, c) < 0.9


def test_random_seed_reaches_ants_and_is_restored(tmp_path):
    """Same seed, one ITK thread: identical transforms; another seed: a different one.

    ANTsPy 0.6 drops a ``random_seed`` argument silently, so this failed before
    :func:`register_affine` set ``ants.config._random_seed``. ITK reads its thread count once per
    process, hence the subprocess.
    """
    script = textwrap.dedent("""
        import sys
        import ants
        import numpy as np
        sys.path.insert(0, sys.argv[1])
        import test_registration as T
        from bids_app.core import registration

        fixed, moving, _ = T._make_pair()
        runs = [registration.register_affine(moving, fixed, random_seed=s).parameters for s in (5, 5, 6)]
        assert ants.config._random_seed is None, ants.config._random_seed
        print(np.array_equal(runs[0], runs[1]), np.abs(runs[0] - runs[2]).max() > 0)
    """)
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["True", "True"], proc.stdout
