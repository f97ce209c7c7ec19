"""Tests for bids_app.reports.reportlets on tiny synthetic volumes."""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_app.reports import reportlets as rl

SVG_NS = "{http://www.w3.org/2000/svg}"
XLINK_HREF = "{http://www.w3.org/1999/xlink}href"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHAPE = (20, 24, 18)


# ---------------------------------------------------------------- synthetic data
def _affine(zooms=(1.0, 1.0, 1.0), shape=SHAPE, flip_x=False, angle_deg=0.0):
    """Affine centring the volume on world (0, 0, 0); optionally LAS and/or oblique."""
    lin = np.diag(zooms).astype(float)
    if flip_x:
        lin[:, 0] *= -1
    if angle_deg:
        a = math.radians(angle_deg)
        rot = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
        lin = rot @ lin
    centre = (np.asarray(shape) - 1) / 2.0
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = -lin @ centre
    return aff


def _blob(affine, shape=SHAPE, centre_mm=(3.0, -2.0, 1.0), radius_mm=6.0, seed=0):
    """Ellipsoidal blob with a gradient and a little noise, defined in world space."""
    ijk = np.indices(shape).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:4]).T.reshape(*shape, 3)
    dist = np.linalg.norm((xyz - np.asarray(centre_mm)) / np.array([1.0, 1.3, 0.9]), axis=-1)
    data = np.where(dist < radius_mm, 100.0 + 4.0 * xyz[..., 0], 0.0)
    data += np.random.default_rng(seed).normal(0, 2.0, shape) * (dist < radius_mm + 2)
    return nb.Nifti1Image(data.astype(np.float32), affine)


def _mask_of(img, threshold=50.0):
    return nb.Nifti1Image((img.get_fdata() > threshold).astype(np.uint8), img.affine)


def _las_copy(img):
    """The same image stored LAS (x axis flipped in voxel order and affine)."""
    data = np.asanyarray(img.dataobj)[::-1]
    flip = np.eye(4)
    flip[0, 0] = -1
    flip[0, 3] = img.shape[0] - 1
    return nb.Nifti1Image(np.ascontiguousarray(data), img.affine @ flip)


AFFINES = {
    "ras-iso": _affine(),
    "las-iso": _affine(flip_x=True),
    "ras-aniso": _affine(zooms=(1.0, 1.5, 3.0)),
    "las-aniso": _affine(zooms=(0.8, 1.2, 2.5), flip_x=True),
    "oblique": _affine(zooms=(1.0, 1.0, 1.2), angle_deg=12.0),
}


# ------------------------------------------------------------------ validation
def _svg_root(path: Path) -> ET.Element:
    assert path.is_file() and path.stat().st_size > 0
    assert path.stat().st_size < rl.MAX_SVG_BYTES
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG_NS}svg"
    return root


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_MAGIC


def _groups(root: ET.Element, prefix: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG_NS}g") if g.get("id", "").startswith(prefix)]


def _no_temp_files(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


# ----------------------------------------------------------------- orientation
def test_volume_is_ras_whatever_the_storage_order():
    ras = _blob(_affine())
    las = _las_copy(ras)
    assert nb.aff2axcodes(las.affine) == ("L", "A", "S")
    v_ras, v_las = rl._volume(ras), rl._volume(las)
    np.testing.assert_allclose(v_ras.data, v_las.data)
    for a in range(3):
        np.testing.assert_allclose(v_ras.coords[a], v_las.coords[a])
        assert np.all(np.diff(v_ras.coords[a]) > 0)  # coordinates increase: R, A, S


def test_planes_put_right_anterior_superior_at_the_expected_side():
    # bright voxel at world right/anterior/superior of centre
    img = _blob(_affine(), centre_mm=(0, 0, 0))
    data = np.zeros(SHAPE, np.float32)
    data[15, 18, 12] = 1.0  # +x (right), +y (anterior), +z (superior) of centre
    vol = rl._volume(_las_copy(nb.Nifti1Image(data, img.affine)))
    ax = vol.plane(vol.data, "axial", vol.index_of(2, vol.coords[2][12]))
    row, col = np.unravel_index(np.argmax(ax), ax.shape)
    assert col > ax.shape[1] / 2  # right of the subject on the right: neurological
    assert row > ax.shape[0] / 2  # anterior at high rows, drawn up with origin="lower"
    sag = vol.plane(vol.data, "sagittal", vol.index_of(0, vol.coords[0][15]))
    row, col = np.unravel_index(np.argmax(sag), sag.shape)
    assert row > sag.shape[0] / 2 and col > sag.shape[1] / 2  # superior up, anterior right
    left, right, bottom, top = vol.extent("coronal")
    assert left < right and bottom < top


def test_robust_window_ignores_zeros_and_outliers():
    data = np.zeros((10, 10, 10), np.float32)
    data[2:8, 2:8, 2:8] = np.linspace(10, 20, 216).reshape(6, 6, 6)
    data[0, 0, 0] = 1e6
    lo, hi = rl._robust_window(data)
    assert 9.9 < lo < 11 and 19 < hi < 1000


# --------------------------------------------------------------------- mosaic
@pytest.mark.parametrize("name", sorted(AFFINES))
def test_plot_mosaic_svg_with_contour(tmp_path, name):
    img = _blob(AFFINES[name])
    out = rl.plot_mosaic(img, tmp_path / "mosaic.svg", contours=[(_mask_of(img), "#ff0000", "blob")],
                         title=f"blob {name}")
    assert out == tmp_path / "mosaic.svg"
    root = _svg_root(out)
    contour_groups = _groups(root, "mosaic-contour-")
    assert contour_groups, "no contour group"
    assert any(g.iter(f"{SVG_NS}path") for g in contour_groups)
    assert sum(1 for _ in contour_groups[0].iter(f"{SVG_NS}path")) >= 1
    assert len(_groups(root, "mosaic-sagittal-")) == 6
    assert len(list(root.iter(f"{SVG_NS}image"))) == 18
    text = out.read_text()
    assert "blob" in text and f"blob {name}" in text  # legend label and title kept as text
    _no_temp_files(tmp_path)


def test_plot_mosaic_png_and_options(tmp_path):
    img = _blob(AFFINES["ras-aniso"])
    out = rl.plot_mosaic(img, tmp_path / "m.png", n_cuts=3, views=("axial", "coronal"))
    _assert_png(out)
    out = rl.plot_mosaic(img, tmp_path / "m.svg", n_cuts=3, views=("axial",), bbox_from=_mask_of(img))
    root = _svg_root(out)
    assert len(_groups(root, "mosaic-axial-")) == 3
    assert not _groups(root, "mosaic-sagittal-")


def test_plot_mosaic_contour_on_another_grid(tmp_path):
    img = _blob(AFFINES["las-iso"])
    # mask on a coarser RAS grid covering the same world space
    coarse = _affine(zooms=(2.0, 2.0, 2.0), shape=(10, 12, 9))
    mask = _mask_of(_blob(coarse, shape=(10, 12, 9)))
    out = rl.plot_mosaic(img, tmp_path / "m.svg", contours=[(mask, "cyan", "coarse mask")])
    root = _svg_root(out)
    assert any(any(True for _ in g.iter(f"{SVG_NS}path")) for g in _groups(root, "mosaic-contour-"))


def test_plot_mosaic_rejects_bad_arguments(tmp_path):
    img = _blob(AFFINES["ras-iso"])
    with pytest.raises(ValueError):
        rl.plot_mosaic(img, tmp_path / "m.jpg")
    with pytest.raises(ValueError):
        rl.plot_mosaic(img, tmp_path / "m.svg", views=("oblique",))
    with pytest.raises(ValueError):
        rl.plot_mosaic(nb.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), tmp_path / "m.svg")


def test_plot_mosaic_accepts_a_path_and_empty_image(tmp_path):
    img = _blob(AFFINES["ras-iso"])
    nb.save(img, tmp_path / "img.nii.gz")
    _svg_root(rl.plot_mosaic(tmp_path / "img.nii.gz", tmp_path / "a.svg"))
    empty = nb.Nifti1Image(np.zeros(SHAPE, np.float32), img.affine)
    _svg_root(rl.plot_mosaic(empty, tmp_path / "b.svg", contours=[(empty, "red", "empty")]))


# ----------------------------------------------------------------- flicker
def _assert_flicker(root: ET.Element, text: str) -> None:
    before = [g for g in root.iter(f"{SVG_NS}g") if g.get("class") == "before"]
    after = [g for g in root.iter(f"{SVG_NS}g") if g.get("class") == "after"]
    assert before and after
    assert any(True for g in before for _ in g.iter(f"{SVG_NS}image"))
    assert any(True for g in after for _ in g.iter(f"{SVG_NS}image"))
    style = "".join(s.text or "" for s in root.iter(f"{SVG_NS}style"))
    assert ".after" in style and "svg:hover .after" in style and "opacity" in style
    assert "hover to see" in text
    assert "arborseg-flicker" in root.get("class", "")


def test_plot_before_after_svg_flicker(tmp_path):
    before = _blob(AFFINES["las-aniso"])
    after = nb.Nifti1Image(before.get_fdata().astype(np.float32) * 0.5 + 7, before.affine)
    out = rl.plot_before_after(before, after, tmp_path / "ba.svg", labels=("raw", "denoised"), n_cuts=4)
    root = _svg_root(out)
    text = out.read_text()
    _assert_flicker(root, text)
    assert "hover to see denoised" in text
    assert len([i for i in root.iter(f"{SVG_NS}image")]) == 2 * 3 * 4
    _no_temp_files(tmp_path)


def test_plot_before_after_png_and_different_grids(tmp_path):
    before = _blob(AFFINES["ras-iso"])
    after = _blob(_affine(zooms=(2.0, 2.0, 2.0), shape=(10, 12, 9)), shape=(10, 12, 9))
    _assert_png(rl.plot_before_after(before, after, tmp_path / "ba.png"))
    _assert_flicker(_svg_root(rl.plot_before_after(before, after, tmp_path / "ba.svg")),
                    (tmp_path / "ba.svg").read_text())


# ------------------------------------------------------------- registration
def test_plot_registration_edges(tmp_path):
    tpl = _blob(AFFINES["ras-iso"], radius_mm=7.0)
    warped = _las_copy(_blob(AFFINES["ras-iso"], centre_mm=(4.0, -2.0, 1.0), seed=1))
    out = rl.plot_registration(warped, tpl, tmp_path / "reg.svg", template_mask=_mask_of(tpl))
    root = _svg_root(out)
    edges = _groups(root, "mosaic-contour-")
    assert edges and any(True for g in edges for _ in g.iter(f"{SVG_NS}path"))
    assert "template" in out.read_text()
    _assert_png(rl.plot_registration(warped, tpl, tmp_path / "reg.png"))


def test_plot_registration_flicker(tmp_path):
    tpl = _blob(AFFINES["ras-aniso"])
    out = rl.plot_registration(tpl, tpl, tmp_path / "reg.svg", flicker=True, n_cuts=3)
    _assert_flicker(_svg_root(out), out.read_text())
    _assert_png(rl.plot_registration(tpl, tpl, tmp_path / "reg.png", flicker=True, n_cuts=3))


# ------------------------------------------------------------------ crop box
BOX = ((-5.0, 6.0), (-8.0, 4.0), (-3.0, 5.0))


def test_plot_crop_box_las_matches_ras(tmp_path):
    ras = _blob(AFFINES["ras-iso"])
    las = _las_copy(ras)
    out_ras = rl.plot_crop_box(ras, BOX, tmp_path / "ras.svg", title="box")
    out_las = rl.plot_crop_box(las, BOX, tmp_path / "las.svg", title="box")
    root = _svg_root(out_las)
    for view in ("sagittal", "coronal", "axial"):
        rect = _groups(root, f"cropbox-rect-{view}")
        assert rect and any(True for _ in rect[0].iter(f"{SVG_NS}path"))
    # same world content => same picture, whatever the storage order
    assert out_ras.read_bytes() == out_las.read_bytes()
    _assert_png(rl.plot_crop_box(las, BOX, tmp_path / "las.png"))


def test_plot_crop_box_box_outside_fov_and_bad_box(tmp_path, caplog):
    img = _blob(AFFINES["las-aniso"])
    with caplog.at_level(logging.WARNING, logger="bids_app.reports.reportlets"):
        out = rl.plot_crop_box(img, ((40, -40), (-50, 50), (-5, 5)), tmp_path / "c.svg")
    _svg_root(out)
    assert "beyond" in caplog.text
    with pytest.raises(ValueError):
        rl.plot_crop_box(img, ((0, 1), (0, 1)), tmp_path / "bad.svg")


# --------------------------------------------------------------- group strip
def _rows():
    rows = [{"label": f"sub-{i:02d}", "report": f"sub-{i:02d}.html", "ICV_mL": 1400.0 + 10 * i} for i in range(1, 11)]
    rows.append({"label": "sub-99 <odd> & co", "report": "sub-99.html", "ICV_mL": 5000.0})  # outlier
    rows.append({"label": "sub-none", "report": "sub-none.html", "ICV_mL": None})
    rows.append({"label": "sub-nan", "report": "sub-nan.html", "ICV_mL": float("nan")})
    rows.append({"label": "sub-text", "report": "sub-text.html", "ICV_mL": "n/a"})
    return rows


def test_plot_group_strip_links_and_tooltips(tmp_path):
    out = rl.plot_group_strip(_rows(), "ICV_mL", tmp_path / "strip.svg")
    root = _svg_root(out)
    hrefs = [a.get(XLINK_HREF) for a in root.iter(f"{SVG_NS}a")]
    assert "sub-01.html" in hrefs and "sub-99.html" in hrefs
    assert not {"sub-none.html", "sub-nan.html", "sub-text.html"} & set(hrefs)
    points = _groups(root, "strip-point-")
    assert len(points) == 11
    titles = [t.text for g in points for t in g.findall(f"{SVG_NS}title")]
    assert "sub-01: 1410" in titles
    assert any(t.startswith("sub-99 <odd> & co") and "outlier" in t for t in titles)
    text = out.read_text()
    assert rl.OUTLIER_COLOR in text and rl.POINT_COLOR in text
    _no_temp_files(tmp_path)


def test_plot_group_strip_edge_cases(tmp_path):
    _svg_root(rl.plot_group_strip([], "ICV_mL", tmp_path / "empty.svg"))
    _svg_root(rl.plot_group_strip([{"label": "a", "x": 1.0}], "x", tmp_path / "one.svg", link_key="missing"))
    _assert_png(rl.plot_group_strip(_rows(), "ICV_mL", tmp_path / "strip.png"))


# ------------------------------------------------------------------ file size
def test_svg_stays_under_size_limit_for_noisy_volumes(tmp_path):
    rng = np.random.default_rng(0)
    shape = (96, 112, 96)
    noise = nb.Nifti1Image(rng.uniform(1, 100, shape).astype(np.float32), _affine(shape=shape))
    other = nb.Nifti1Image(rng.uniform(1, 100, shape).astype(np.float32), noise.affine)
    out = rl.plot_before_after(noise, other, tmp_path / "noise.svg", n_cuts=8)
    assert out.stat().st_size < rl.MAX_SVG_BYTES
    _svg_root(out)


def test_svg_resolution_is_lowered_to_meet_the_size_budget(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(1)
    shape = (64, 72, 64)
    noise = nb.Nifti1Image(rng.uniform(1, 100, shape).astype(np.float32), _affine(shape=shape))
    monkeypatch.setattr(rl, "_SVG_TARGET_BYTES", 120_000)
    with caplog.at_level(logging.DEBUG, logger="bids_app.reports.reportlets"):
        out = rl.plot_mosaic(noise, tmp_path / "noise.svg", n_cuts=4)
    assert "retrying" in caplog.text
    assert out.stat().st_size <= 120_000
    _svg_root(out)


# ------------------------------------------------------------------ segmentation
def _dseg_of(img):
    """Two labelled halves of the blob (values 17 and 53) and a third label (16) that is never drawn empty."""
    data = img.get_fdata()
    labels = np.zeros(img.shape, np.int16)
    inside = data > 50
    half = np.indices(img.shape)[0] < img.shape[0] // 2
    labels[inside & half] = 17
    labels[inside & ~half] = 53
    return nb.Nifti1Image(labels, img.affine)


@pytest.mark.parametrize("name", ["ras-iso", "las-aniso"])
def test_plot_segmentation_outlines_every_label(tmp_path, name):
    img = _blob(AFFINES[name])
    out = rl.plot_segmentation(img, _dseg_of(img), tmp_path / "seg.svg", colors={17: "#dcd814", 53: "#67ffff"},
                               title="segmentation")
    root = _svg_root(out)
    contours = _groups(root, "mosaic-contour-")
    assert {g.get("id").split("-")[2] for g in contours} == {"0", "1"}  # one contour per label value
    text = out.read_text()
    assert "#dcd814" in text and "#67ffff" in text
    _no_temp_files(tmp_path)


def test_plot_segmentation_on_another_grid_and_empty(tmp_path, caplog):
    img = _blob(AFFINES["ras-iso"])
    coarse = _blob(_affine(zooms=(2.0, 2.0, 2.0), shape=(10, 12, 9)))
    _svg_root(rl.plot_segmentation(img, _dseg_of(coarse), tmp_path / "grid.svg", colors={}))
    empty = nb.Nifti1Image(np.zeros(SHAPE, np.int16), img.affine)
    with caplog.at_level(logging.WARNING):
        _svg_root(rl.plot_segmentation(img, empty, tmp_path / "empty.svg", colors={}))
    assert "empty" in caplog.text


def test_plot_map_uses_a_colour_map(tmp_path):
    img = _blob(AFFINES["ras-iso"])
    out = rl.plot_map(img, tmp_path / "map.svg", cmap="inferno", unit="nats", title="entropy",
                      bbox_from=_mask_of(img))
    root = _svg_root(out)
    assert len(list(root.iter(f"{SVG_NS}image"))) == 18
    assert "inferno colour scale from 0" in out.read_text() and "nats" in out.read_text()
    _assert_png(rl.plot_map(img, tmp_path / "map.png"))


def test_plot_group_structures(tmp_path):
    rows = [{"label": f"sub-{i:02d}", "report": f"sub-{i:02d}.html", "A": 100.0 + i, "B": 5.0 + 0.1 * i,
             "flag": "warn" if i == 3 else "pass"} for i in range(8)]
    rows.append({"label": "sub-99", "report": "sub-99.html", "A": 400.0, "B": None, "flag": "pass"})
    out = rl.plot_group_structures(rows, [("A", "Structure A"), ("B", "Structure B")], tmp_path / "fam.svg",
                                   flag_key="flag", title="family")
    root = _svg_root(out)
    points = _groups(root, "structure-point-")
    assert len(points) == 9 + 8
    hrefs = [a.get(XLINK_HREF) for a in root.iter(f"{SVG_NS}a")]
    assert "sub-99.html" in hrefs
    titles = [t.text for g in points for t in g.findall(f"{SVG_NS}title")]
    assert any(t.startswith("sub-99: Structure A 400") and "outlier" in t for t in titles)
    assert sum("segmentation QC: warn" in t for t in titles) == 2  # sub-03 in both strips
    text = out.read_text()
    assert "Structure A" in text and rl.QC_FLAG_COLOR in text
    _svg_root(rl.plot_group_structures([], [("A", "A")], tmp_path / "none.svg"))
    _assert_png(rl.plot_group_structures(rows, [("A", "A")], tmp_path / "fam.png"))
