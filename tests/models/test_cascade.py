"""The cerebellum cascade (bids_app.models.cascade): combination maths, prior folding, model selection,
and the ensemble / MC-dropout path on tiny random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bids_app.core.labels import load_protocol
from bids_app.models.cascade import (
    HEMISPHERES_TASK,
    LOBULES_TASK,
    cascade_index,
    cerebellum_mask,
    combine,
    default_cerebellum_models,
    fold_prior,
    lobule_input,
    merged_cv,
    prior_channel_positions,
    prior_kind,
    segment_cerebellum,
    select_cerebellum_models,
)
from bids_app.models.checkpoint import ModelError

LOBULES = load_protocol("lobules")
L13 = load_protocol("lobules13")
HEMI = load_protocol("hemispheres")


def prior_channels(order=None, prefix="prior:"):
    names = [f"{prefix}{n}" for n in L13.names[1:]]
    return [{"name": "T1w", "normalisation": "percentile99"}] + [
        {"name": names[i], "normalisation": "none"} for i in (order or range(len(names)))]


def tiny_cerebellum_checkpoint(path_stem, *, task, arch="unet", voxel_size_mm=1.0, prior=False, seed=0):
    """A random tiny UNet3D (depth 1) or DPN (2 levels) saved as a cerebellum checkpoint; returns the manifest."""
    from bids_app.models.checkpoint import save_checkpoint
    from bids_app.models.dpn import DPN
    from bids_app.models.unet import UNet3D

    torch.manual_seed(seed)
    protocol = HEMI if task == HEMISPHERES_TASK else L13
    if prior:  # True: the atlas prior's channels; "population": the population prior's
        channels = prior_channels(prefix="population:" if prior == "population" else "prior:")
    else:
        channels = [{"name": "T1w", "normalisation": "percentile99"}]
    if arch == "unet":
        net = UNet3D(in_channels=len(channels), n_classes=len(protocol), base_filters=2, depth=1)
    else:
        net = DPN(in_channels=len(channels), n_classes=len(protocol), base_filters=2, levels=2, convs_per_level=1)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(net, path_stem, {
        "name": path_stem.name, "version": "0.0.1", "task": task, "label_protocol": protocol.as_manifest(),
        "input_channels": channels, "voxel_size_mm": voxel_size_mm,
        "training": {"data": "random weights (tests)", "licence": "CC0-1.0", "seed": seed}, "metrics": {},
    })
    return path_stem.with_name(path_stem.name + ".json")


def _dirichlet(k, shape, seed):
    rng = np.random.default_rng(seed)
    p = rng.gamma(0.5, size=(k,) + shape).astype(np.float32) + 1e-6
    return p / p.sum(axis=0)


# --------------------------------------------------------------------------- maths


def test_cascade_index_comes_from_the_tables():
    sides, lobes = cascade_index()
    assert len(sides) == len(LOBULES) == 27
    for j, (value, name) in enumerate(zip(LOBULES.indices, LOBULES.names)):
        if value == 0:
            assert (sides[j], lobes[j]) == (0, 0)
            continue
        assert HEMI.names[sides[j]] == ("Left-Cerebellum" if name.startswith("Left-") else "Right-Cerebellum")
        assert L13.names[lobes[j]] == name.replace("Left-", "").replace("Right-", "")


def test_combination_sums_to_one_and_assigns_sides():
    shape = (5, 4, 3)
    p1, p2 = _dirichlet(3, shape, 1), _dirichlet(14, shape, 2)
    out = combine(p1, p2)
    assert out.shape == (27,) + shape and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(out[0], p1[0] + (p1[1] + p1[2]) * p2[0], rtol=1e-6)
    np.testing.assert_allclose(out[LOBULES.position(105)], p1[2] * p2[5], rtol=1e-6)
    np.testing.assert_allclose(out[LOBULES.position(13)], p1[1] * p2[13], rtol=1e-6)
    # summing over the lobules of a side gives that side's share of the cerebellum
    left = [LOBULES.position(v) for v in range(1, 14)]
    np.testing.assert_allclose(out[left].sum(axis=0), p1[1] * (1 - p2[0]), rtol=1e-5)

    # confident nets: side from net 1, lobule from net 2
    p1 = np.zeros((3, 2, 1, 1), np.float32)
    p1[1, 0], p1[2, 1] = 1, 1
    p2 = np.zeros((14, 2, 1, 1), np.float32)
    p2[6] = 1  # Crus I everywhere
    labels = LOBULES.to_labels(combine(p1, p2).argmax(axis=0))
    assert labels.ravel().tolist() == [6, 106]
    p2[:] = 0
    p2[0] = 1  # net 2 says background inside net 1's cerebellum: background
    assert LOBULES.to_labels(combine(p1, p2).argmax(axis=0)).ravel().tolist() == [0, 0]


def test_prior_folding_sums_left_and_right():
    shape = (3, 2, 2)
    prior = _dirichlet(27, shape, 3)
    folded = fold_prior(prior)
    assert folded.shape == (13,) + shape
    for k in range(1, 14):
        expected = prior[LOBULES.position(k)] + prior[LOBULES.position(100 + k)]
        np.testing.assert_allclose(folded[k - 1], expected, rtol=1e-6)
    np.testing.assert_allclose(folded.sum(axis=0), 1 - prior[0], atol=1e-5)
    with pytest.raises(ValueError, match="27"):
        fold_prior(prior[:5])


def test_mask_dilation_and_lobule_input():
    p1 = np.zeros((3, 9, 9, 9), np.float32)
    p1[0] = 1
    p1[:, 4, 4, 4] = (0, 1, 0)
    mask = cerebellum_mask(p1)
    assert mask.sum() == 25 and mask[4, 4, 2] and not mask[4, 3, 2]  # 6-connected, twice
    t1w = np.full((9, 9, 9), 2.0, np.float32)
    prior13 = np.stack([np.full((9, 9, 9), k, np.float32) for k in range(13)])
    x = lobule_input(t1w, mask, None, None)
    assert x.shape == (1, 9, 9, 9) and x[0][mask].min() == 2 and x[0][~mask].max() == 0
    order = tuple(reversed(range(13)))
    x = lobule_input(t1w, mask, prior13, order)
    assert x.shape == (14, 9, 9, 9) and [float(x[c, 0, 0, 0]) for c in range(1, 14)] == list(map(float, order))


def test_prior_channel_layouts():
    assert prior_channel_positions({"input_channels": [{"name": "T1w"}]}) is None
    order = list(reversed(range(13)))
    assert prior_channel_positions({"input_channels": prior_channels(order)}) == tuple(order)
    abbrev = [{"name": "T1w"}] + [{"name": f"prior:{a}"} for a in L13.abbreviations[1:]]
    assert prior_channel_positions({"input_channels": abbrev}) == tuple(range(13))
    with pytest.raises(ModelError, match="first input channel"):
        prior_channel_positions({"input_channels": [{"name": "T2w"}]})
    with pytest.raises(ModelError, match="neither T1w nor"):
        prior_channel_positions({"input_channels": [{"name": "T1w"}, {"name": "T2w"}]})
    with pytest.raises(ModelError, match="each once"):
        prior_channel_positions({"input_channels": prior_channels()[:5]})
    population = prior_channels(order, prefix="population:")
    assert prior_channel_positions({"input_channels": population}) == tuple(order)
    assert prior_kind({"input_channels": population}) == "population"
    assert prior_kind({"input_channels": prior_channels()}) == "atlas"
    assert prior_kind({"input_channels": [{"name": "T1w"}]}) is None
    mixed = prior_channels()[:7] + population[7:]
    with pytest.raises(ModelError, match="one kind of prior per model"):
        prior_channel_positions({"input_channels": mixed})


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cerebellum-models")
    return {
        "hemi_unet": tiny_cerebellum_checkpoint(root / "hemi-unet", task=HEMISPHERES_TASK, seed=1),
        "hemi_dpn": tiny_cerebellum_checkpoint(root / "hemi-dpn", task=HEMISPHERES_TASK, arch="dpn",
                                               voxel_size_mm=2.0, seed=2),
        "lob_unet": tiny_cerebellum_checkpoint(root / "lob-unet", task=LOBULES_TASK, seed=3),
        "lob_prior_dpn": tiny_cerebellum_checkpoint(root / "lob-prior-dpn", task=LOBULES_TASK, arch="dpn",
                                                    prior=True, seed=4),
        "lob_prior_unet": tiny_cerebellum_checkpoint(root / "lob-prior-unet", task=LOBULES_TASK, prior=True,
                                                     voxel_size_mm=2.0, seed=5),
        "lob_population_dpn": tiny_cerebellum_checkpoint(root / "lob-population-dpn", task=LOBULES_TASK, arch="dpn",
                                                         prior="population", seed=6),
        "root": root,
    }


def test_model_selection(models, tmp_path):
    all_paths = [models[k] for k in ("hemi_unet", "hemi_dpn", "lob_unet", "lob_prior_dpn")]
    with_lib = select_cerebellum_models(all_paths, prior_available=True)
    assert with_lib.prior and with_lib.reason == ""
    assert with_lib.hemispheres == (models["hemi_unet"].resolve(), models["hemi_dpn"].resolve())
    assert with_lib.lobules == (models["lob_prior_dpn"].resolve(),) and with_lib.unused == (
        models["lob_unet"].resolve(),)
    without = select_cerebellum_models(all_paths, prior_available=False, prior_reason="no library")
    assert not without.prior and without.lobules == (models["lob_unet"].resolve(),) and without.reason == "no library"
    fallback = select_cerebellum_models([models["hemi_unet"], models["lob_unet"]], prior_available=True)
    assert not fallback.prior and "no lobule model takes atlas prior" in fallback.reason
    with pytest.raises(ModelError, match="--library-dir"):
        select_cerebellum_models([models["hemi_unet"], models["lob_prior_dpn"]], prior_available=False)
    # the population prior: chosen without a library when it fits the run; the atlas prior first with one
    every = all_paths + [models["lob_population_dpn"]]
    pop = select_cerebellum_models(every, prior_available=False, prior_reason="no library", population_available=True)
    assert pop.population and not pop.prior and pop.reason == "no library"
    assert pop.lobules == (models["lob_population_dpn"].resolve(),)
    assert set(pop.unused) == {models["lob_unet"].resolve(), models["lob_prior_dpn"].resolve()}
    lib = select_cerebellum_models(every, prior_available=True, population_available=True)
    assert lib.prior and not lib.population and lib.lobules == (models["lob_prior_dpn"].resolve(),)
    no_pop = select_cerebellum_models(every, prior_available=False, population_available=False)
    assert not no_pop.population and no_pop.lobules == (models["lob_unet"].resolve(),)
    with pytest.raises(ModelError, match="population prior: not available"):
        select_cerebellum_models([models["hemi_unet"], models["lob_population_dpn"]], prior_available=False)
    with pytest.raises(ModelError, match="cerebellum-hemispheres"):
        select_cerebellum_models([models["lob_unet"]], prior_available=False)
    with pytest.raises(ModelError, match="cerebellum-lobules"):
        select_cerebellum_models([models["hemi_unet"]], prior_available=False)
    from tests.conftest import tiny_wholebrain_checkpoint

    wb = tiny_wholebrain_checkpoint(tmp_path / "wb")
    with pytest.raises(ModelError, match="not a cerebellum model"):
        select_cerebellum_models([models["hemi_unet"], models["lob_unet"], wb], prior_available=False)
    # a tampered weights file is refused by name, before any work
    import shutil

    for suffix in (".json", ".safetensors"):
        shutil.copy(models["lob_unet"].with_suffix(suffix), tmp_path / f"bad{suffix}")
    with open(tmp_path / "bad.safetensors", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="checksum"):
        select_cerebellum_models([models["hemi_unet"], tmp_path / "bad.json"], prior_available=False)
    with pytest.raises(ModelError, match="no such model"):
        select_cerebellum_models([tmp_path / "nothing"], prior_available=False)


def test_default_models_by_task(models, tmp_path, monkeypatch, no_package_models):
    monkeypatch.setenv("ARBORSEG_MODELS_DIR", str(tmp_path / "none"))
    assert default_cerebellum_models() == []
    found = default_cerebellum_models(models["root"])
    assert len(found) == 6 and all(p.endswith(".json") for p in found)


# --------------------------------------------------------------------------- ensemble / MC path


def _crop(shape=(16, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    r = sum(((g - c) / (0.4 * s)) ** 2 for g, c, s in zip(grid, centre, shape))
    return np.where(r < 1, 0.5 + 0.4 * rng.random(shape), 0.05).astype(np.float32)


def test_ensemble_mc_path_on_tiny_checkpoints(models):
    crop = _crop()
    prior = _dirichlet(27, crop.shape, 7)
    hemis = [models["hemi_unet"], models["hemi_dpn"]]  # 1 mm and 2 mm members
    lobes = [models["lob_prior_dpn"], models["lob_prior_unet"]]
    result = segment_cerebellum(crop, hemis, lobes, prior=prior, mc_samples=3, seed=3, device="cpu",
                                num_threads=1)
    assert result.prior_used and result.n_samples == 3
    assert result.probabilities.shape == (27,) + crop.shape
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-4)
    assert result.labels.dtype == np.int16 and set(np.unique(result.labels)) <= set(LOBULES.indices)
    np.testing.assert_array_equal(result.labels, LOBULES.to_labels(result.probabilities.argmax(axis=0)))
    assert result.entropy.shape == crop.shape and 0 <= result.entropy.min() and result.entropy.max() <= np.log(27)
    np.testing.assert_allclose(result.hemisphere_probabilities.sum(axis=0), 1.0, atol=1e-4)
    assert result.mc_volumes_mm3.shape == (3, 27)
    np.testing.assert_allclose(result.mc_volumes_mm3.sum(axis=1), crop.size)  # 1 mm voxels
    assert result.cv_percent.shape == (27,) and result.qc_flag in ("pass", "warn")
    assert len(result.structure_flags()) == 27
    cv, mcv, flag = merged_cv(result, "hemispheres")
    assert cv.shape == (3,) and flag in ("pass", "warn")
    # reproducible with the seed; another seed draws other dropout masks
    again = segment_cerebellum(crop, hemis, lobes, prior=prior, mc_samples=3, seed=3, device="cpu", num_threads=1)
    np.testing.assert_array_equal(again.probabilities, result.probabilities)
    other = segment_cerebellum(crop, hemis, lobes, prior=prior, mc_samples=3, seed=4, device="cpu", num_threads=1)
    assert not np.array_equal(other.probabilities, result.probabilities)
    with pytest.raises(ValueError, match="no prior"):
        segment_cerebellum(crop, hemis, lobes, mc_samples=1, device="cpu")


class _Fixed(nn.Module):
    """Known probabilities: class ``split(x)`` gets 0.9; records its input."""

    def __init__(self, n_classes, split):
        super().__init__()
        self.n_classes, self.split, self.seen = n_classes, split, None
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        self.seen = x.detach().clone()
        classes = torch.as_tensor(self.split(x.shape[2:]))
        onehot = torch.nn.functional.one_hot(classes.long(), self.n_classes).permute(3, 0, 1, 2)[None].float()
        return torch.log(onehot * 0.9 + 0.1 / self.n_classes).expand(x.shape[0], -1, -1, -1, -1)


def _manifest(protocol, channels, vox=1.0, name="fixed"):
    return {"name": name, "voxel_size_mm": vox, "input_channels": channels, "label_protocol": protocol.as_manifest()}


def test_cascade_combines_side_and_lobule_and_masks_net2():
    shape = (10, 6, 6)
    crop = np.ones(shape, np.float32)

    def sides(s):  # background at x < 3, left at x < 6, right beyond
        out = np.where(np.arange(s[0]) < 6, 1, 2)[:, None, None] * np.ones(s, int)
        out[:3] = 0
        return out

    def lobule(s):  # the lobule is the y index + 1 (Cerebellum-Lobule-I-II ... VI)
        return (np.arange(s[1]) + 1)[None, :, None] * np.ones(s, int)

    net1, net2 = _Fixed(3, sides), _Fixed(14, lobule)
    prior = np.zeros((27,) + shape, np.float32)
    prior[LOBULES.position(102)] = 1.0  # right III everywhere
    result = segment_cerebellum(crop, [(net1, _manifest(HEMI, [{"name": "T1w"}]))],
                                [(net2, _manifest(L13, prior_channels()))], prior=prior, mc_samples=2, device="cpu",
                                hemisphere_prior_weight=0.0)  # net 1 alone: its sides are the test's
    assert result.hemisphere_prior_weight == 0.0
    expected = np.where(np.arange(10) < 6, 0, 100)[:, None, None] + lobule(shape)
    expected[:3] = 0
    np.testing.assert_array_equal(result.labels, expected)
    seen = net2.seen[0].numpy()
    assert seen.shape == (14,) + shape
    # the T1w is masked by net 1's cerebellum (x >= 3) dilated by 2 voxels (x >= 1)
    assert seen[0, 0].max() == 0 and seen[0, 1:].min() == 1
    np.testing.assert_array_equal(seen[1 + 1], 1.0)  # folded prior: lobule III (class 2 -> channel 1 + 1)
    assert seen[1:].sum() == np.prod(shape)


def test_atlas_prior_hemispheres_are_averaged_into_net1():
    """With atlas-prior lobule models, net 1's probabilities are averaged with the prior's sides (the default
    weight, another one, or none); the population prior, the same for everyone, is never mixed in."""
    from bids_app.models.cascade import HEMISPHERE_PRIOR_WEIGHT, mix_hemisphere_prior, prior_hemispheres

    shape = (10, 6, 6)
    crop = np.ones(shape, np.float32)
    prior = np.zeros((27,) + shape, np.float32)
    prior[LOBULES.position(102)] = 1.0  # right III everywhere
    prior[LOBULES.position(0), :2] = 1.0
    prior[LOBULES.position(102), :2] = 0.0  # background at x < 2

    def run(weight, prefix="prior:"):
        net1 = _Fixed(3, lambda s: np.where(np.arange(s[0]) < 6, 1, 2)[:, None, None] * np.ones(s, int))
        net2 = _Fixed(14, lambda s: np.full(s, 2))
        return segment_cerebellum(crop, [(net1, _manifest(HEMI, [{"name": "T1w"}]))],
                                  [(net2, _manifest(L13, prior_channels(prefix=prefix)))], prior=prior, mc_samples=2,
                                  device="cpu", hemisphere_prior_weight=weight)

    alone, default, full = run(0.0), run(None), run(1.0)
    assert HEMISPHERE_PRIOR_WEIGHT == 0.5 and default.hemisphere_prior_weight == 0.5
    sides = np.zeros((3,) + shape, np.float32)
    sides[0, :2] = 1.0
    sides[2, 2:] = 1.0
    np.testing.assert_allclose(default.hemisphere_probabilities, 0.5 * alone.hemisphere_probabilities + 0.5 * sides,
                               atol=1e-6)
    np.testing.assert_allclose(full.hemisphere_probabilities, sides, atol=1e-6)
    np.testing.assert_allclose(prior_hemispheres(prior), sides)
    np.testing.assert_allclose(mix_hemisphere_prior(alone.hemisphere_probabilities, sides, 0.5),
                               default.hemisphere_probabilities, atol=1e-6)
    # net 1 says left for x < 6; the prior says right: alone left, fully the prior's right, half-half: net 1's
    # 0.93 left vs the prior's 1.0 right -> right
    assert (alone.labels[2:6] == 2).all() and (full.labels[2:6] == 102).all() and (full.labels[:2] == 0).all()
    population = run(None, prefix="population:")
    assert population.hemisphere_prior_weight == 0.0
    np.testing.assert_allclose(population.hemisphere_probabilities, alone.hemisphere_probabilities, atol=1e-6)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        run(1.5)


def test_stage_mismatches_are_model_errors():
    crop = np.ones((4, 4, 4), np.float32)
    net1, net2 = _Fixed(3, lambda s: np.zeros(s, int)), _Fixed(14, lambda s: np.zeros(s, int))
    with pytest.raises(ModelError, match="expected 'hemispheres'"):
        segment_cerebellum(crop, [(net1, _manifest(L13, [{"name": "T1w"}]))],
                           [(net2, _manifest(L13, [{"name": "T1w"}]))], mc_samples=1, device="cpu")
    with pytest.raises(ModelError, match="one T1w channel"):
        segment_cerebellum(crop, [(net1, _manifest(HEMI, [{"name": "T2w"}]))],
                           [(net2, _manifest(L13, [{"name": "T1w"}]))], mc_samples=1, device="cpu")


def test_manifest_tasks_are_written(models):
    manifest = json.loads(models["lob_prior_dpn"].read_text())
    assert manifest["task"] == LOBULES_TASK and len(manifest["input_channels"]) == 14


def test_calibrated_cascade_thresholds(models):
    hemi_manifest = json.loads(Path(models["hemi_unet"]).read_text())
    lob_manifest = json.loads(Path(models["lob_unet"]).read_text())
    names = [hemi_manifest["name"], lob_manifest["name"]]
    calibrated = dict(lob_manifest, qc_calibration={
        "ensemble": names, "modality": "T1w", "mc_samples": 2, "method": "test", "source": "test", "study": {},
        "protocols": {"lobules": {"mean_cv_threshold_percent": 40.0,
                                  "structure_thresholds_percent": {LOBULES.names[1]: -1.0}},
                      "hemispheres": {"mean_cv_threshold_percent": 30.0, "structure_thresholds_percent": {}}}})
    kwargs = dict(mc_samples=2, device="cpu", num_threads=1)
    result = segment_cerebellum(_crop(), [models["hemi_unet"]], [models["lob_unet"]],
                                hemisphere_manifests=[hemi_manifest], lobule_manifests=[calibrated], **kwargs)
    assert result.qc_calibration is not None and result.qc_threshold == 40.0
    thresholds = result.class_thresholds()
    assert thresholds[1] == -1.0 and set(thresholds[2:]) == {40.0}
    assert result.structure_flags()[1] == "warn"
    assert merged_cv(result, "hemispheres")[2] == ("pass" if merged_cv(result, "hemispheres")[1] <= 30.0 else "warn")
    # another lobule model: not the calibrated cascade, so the T1w default
    other = segment_cerebellum(_crop(), [models["hemi_unet"]], [models["lob_unet"], models["lob_unet"]],
                               hemisphere_manifests=[hemi_manifest], lobule_manifests=[calibrated, lob_manifest],
                               **kwargs)
    assert other.qc_calibration is None and other.qc_threshold == 1.0
