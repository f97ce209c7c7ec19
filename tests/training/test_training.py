"""Training code: packing geometry, augmentation, losses, a resumable seeded run, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bids_app.core.labels import load_protocol
from bids_app.models.checkpoint import load_checkpoint
from bids_app.training import augment
from bids_app.training.cli import main as train_main
from bids_app.training.losses import SegmentationLoss, dice_loss, hard_dice
from bids_app.training.prepare import block_affine, block_mean, block_mode, kfold_subjects
from bids_app.training.trainer import TrainConfig, budget_iterations, fit, learning_rate
from tests.conftest import tiny_wholebrain_checkpoint, tree_state


def test_block_mean_mode_and_affine():
    data = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
    mean = block_mean(data, 2)
    assert mean.shape == (2, 2, 1)
    assert mean[0, 0, 0] == pytest.approx(data[:2, :2, :2].mean())
    classes = np.zeros((2, 2, 2), dtype=np.uint8)
    classes[0, 0, :] = 5  # two voxels of 5, six of 0
    classes[1, 1, 1] = 3
    assert block_mode(classes, 2)[0, 0, 0] == 0
    classes[:, :, 0] = 7  # four 7s beat the rest
    assert block_mode(classes, 2)[0, 0, 0] == 7
    odd = block_mean(np.ones((3, 3, 3), np.float32), 2)  # zero padded to 4
    assert odd.shape == (2, 2, 2) and odd[1, 1, 1] == pytest.approx(1 / 8)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-10, -20, -30]
    coarse = block_affine(affine, 2)
    # block (1, 0, 0) is centred between fine voxels 2 and 3
    assert np.allclose(coarse @ [1, 0, 0, 1], affine @ [2.5, 0.5, 0.5, 1])


def test_kfold_subjects_partition():
    subjects = [f"s{i}" for i in range(15)]
    folds = kfold_subjects(subjects, 3, seed=0)
    assert sorted(sum(folds, [])) == sorted(subjects)
    assert all(len(f) == 5 for f in folds)
    assert folds == kfold_subjects(list(reversed(subjects)), 3, seed=0)


def _blob_case(shape=(20, 20, 20), seed=0):
    rng = np.random.default_rng(seed)
    classes = np.zeros(shape, np.uint8)
    classes[4:16, 4:10, 4:16] = 1
    classes[4:16, 10:16, 4:16] = 2
    image = np.where(classes == 1, 0.5, np.where(classes == 2, 1.0, 0.0)).astype(np.float32)
    image += rng.normal(0, 0.02, shape).astype(np.float32) * (classes > 0)
    return classes, image


def test_make_sample_shapes_normalisation_and_flip_swap():
    classes, image = _blob_case()
    case = {"classes": torch.from_numpy(classes), "image": torch.from_numpy(image)[None]}
    cfg = augment.AugmentConfig(crop=(16, 16, 16))
    gen = torch.Generator().manual_seed(0)
    x, y = augment.make_sample(case, cfg, gen, torch.tensor([0, 2, 1]))
    assert x.shape == (1, 16, 16, 16) and y.shape == (16, 16, 16)
    assert float(x.max()) <= 2.0 and float(x.min()) >= 0.0
    inside = x[x > 1e-3]
    assert torch.quantile(inside, 0.99) == pytest.approx(1.0, abs=0.05)
    # a pure flip (no other transform) mirrors the image and swaps the classes
    only_flip = augment.AugmentConfig.none(crop=(20, 20, 20))
    only_flip = augment.AugmentConfig(**{**only_flip.__dict__, "flip": True})
    seen = set()
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        x, y = augment.make_sample(case, only_flip, gen, torch.tensor([0, 2, 1]))
        flipped = bool((y.numpy() != classes).any())
        seen.add(flipped)
        expected = classes[::-1] if flipped else classes
        if flipped:
            expected = np.array([0, 2, 1])[expected]
        assert np.array_equal(y.numpy(), expected)
    assert seen == {True, False}


def test_synthesis_keeps_background_zero_and_labels_differ():
    gen_labels = torch.zeros((12, 12, 12), dtype=torch.uint8)
    gen_labels[2:10, 2:6, 2:10] = 1
    gen_labels[2:10, 6:10, 2:10] = 2
    cfg = augment.AugmentConfig()
    img = augment.synthesize(gen_labels, 3, cfg, torch.Generator().manual_seed(3))
    assert img.shape == (1, 12, 12, 12)
    assert float(img[0][gen_labels == 0].abs().max()) == 0.0
    assert abs(float(img[0, 4, 3, 5]) - float(img[0, 4, 8, 5])) > 1e-3


def test_losses_perfect_and_wrong_predictions():
    target = torch.zeros((1, 4, 4, 4), dtype=torch.long)
    target[0, :2] = 1
    perfect = torch.nn.functional.one_hot(target, 2).movedim(-1, 1).float() * 50
    assert float(dice_loss(perfect, target)) == pytest.approx(0.0, abs=1e-4)
    wrong = perfect.flip(1)
    assert float(dice_loss(wrong, target)) == pytest.approx(1.0, abs=1e-3)
    assert float(dice_loss(wrong, target, log=True)) > 5
    assert float(SegmentationLoss()(perfect, target)) < 1e-3
    d = hard_dice(target[0], target[0], 3)
    assert d[0] == 1 and d[1] == 1 and torch.isnan(d[2])


def test_learning_rate_schedules():
    cfg = TrainConfig(name="x", architecture="unet", model={}, lr=1.0, warmup=10, iterations=110)
    assert learning_rate(cfg, 0) == pytest.approx(0.1)
    assert learning_rate(cfg, 10) == pytest.approx(1.0)
    assert learning_rate(cfg, 109) < 0.05
    cfg.schedule = "cosine"
    assert learning_rate(cfg, 60) == pytest.approx(0.5)


def _pack(folder, n=4):
    """A tiny packed dataset in the layout of ``arborseg-train prepare`` (protocol cerebrum7)."""
    folder.mkdir(parents=True)
    cases = []
    for i in range(n):
        classes, image = _blob_case((16, 16, 16), seed=i)
        if i < n - 1:
            np.savez(folder / f"c{i}.npz", cls2=classes, img2=image.astype(np.float16))
            cases.append({"case": f"c{i}", "subject": f"s{i}", "kind": "real", "source": "blobs", "licence": "none"})
        else:
            np.savez(folder / f"c{i}.npz", cls2=classes, gen2=classes, gen_values=np.arange(3))
            cases.append({"case": f"c{i}", "subject": f"s{i}", "kind": "labelmap", "source": "blobs",
                          "licence": "none"})
    (folder / "index.json").write_text(json.dumps({"protocol": "cerebrum7", "voxel_size_mm": 2.0, "cases": cases}))


def _config(tmp_path, iterations=4):
    text = f"""
name = "tiny"
architecture = "unet"
protocol = "cerebrum7"
folders = ["packed"]
[model]
in_channels = 1
n_classes = 8
base_filters = 2
depth = 1
[augment]
crop = [8, 8, 8]
[optim]
lr = 0.01
warmup = 1
iterations = {iterations}
[run]
seed = 5
checkpoint_every = 1
log_every = 1
[cv]
cv_folds = 2
"""
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def test_fit_is_seeded_and_resumes_exactly(tmp_path):
    _pack(tmp_path / "data" / "packed")
    cfg_path = _config(tmp_path)
    cfg = TrainConfig.from_toml(cfg_path)
    straight = fit(cfg, tmp_path / "data", tmp_path / "run_a", num_threads=1)
    first = fit(cfg, tmp_path / "data", tmp_path / "run_b", num_threads=1, stop_after=2)
    assert first.name == "state"
    state = json.loads((tmp_path / "run_b" / "state.json").read_text())
    assert state["iteration"] == 2
    resumed = fit(cfg, tmp_path / "data", tmp_path / "run_b", num_threads=1)
    model_a, manifest_a = load_checkpoint(straight)
    model_b, _ = load_checkpoint(resumed)
    for (ka, va), (kb, vb) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert manifest_a["task"] == "wholebrain"
    assert manifest_a["label_protocol"]["name"] == "cerebrum7"
    assert manifest_a["training"]["iterations"] == 4 and manifest_a["voxel_size_mm"] == 2.0


def test_fit_fold_leaves_out_test_subjects(tmp_path, caplog):
    _pack(tmp_path / "data" / "packed")
    cfg = TrainConfig.from_toml(_config(tmp_path, iterations=1))
    out = fit(cfg, tmp_path / "data", tmp_path / "run", fold=0, num_threads=1)
    _, manifest = load_checkpoint(out)
    test = set(manifest["training"]["test_subjects"])
    assert test and manifest["training"]["n_real_cases"] == 3 - len(test & {"s0", "s1", "s2"})


def test_cli_fit_export_and_errors(tmp_path, capsys):
    _pack(tmp_path / "data" / "packed")
    cfg_path = _config(tmp_path, iterations=2)
    assert train_main(["fit", str(cfg_path), "--data", str(tmp_path / "data"), "--run", str(tmp_path / "r"),
                       "--threads", "1"]) == 0
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"cv_mean_dice": 0.5}))
    assert train_main(["export", str(tmp_path / "r" / "final"), str(tmp_path / "out" / "tiny"),
                       "--metrics", str(metrics)]) == 0
    _, manifest = load_checkpoint(tmp_path / "out" / "tiny")
    assert manifest["metrics"]["cv_mean_dice"] == 0.5 and manifest["weights_dtype"] == "float16"
    assert manifest["version"] == "0.1.0" and manifest["name"] == "tiny"
    assert train_main(["export", str(tmp_path / "r" / "final"), str(tmp_path / "out" / "v2"), "--task", "wholebrain",
                       "--model-version", "0.2.0", "--name", "tiny-v2"]) == 0
    _, manifest = load_checkpoint(tmp_path / "out" / "v2")
    assert (manifest["version"], manifest["task"], manifest["name"]) == ("0.2.0", "wholebrain", "tiny-v2")
    assert train_main(["fit", str(cfg_path), "--data", str(tmp_path / "nothing"), "--run", str(tmp_path / "x")]) == 2
    assert "no packed training data" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg_path.read_text() + "\n[extra]\nwhat = 1\n")
    assert train_main(["fit", str(bad), "--data", str(tmp_path / "data"), "--run", str(tmp_path / "y")]) == 2
    assert train_main(["folds", str(cfg_path), "--data", str(tmp_path / "data")]) == 0
    assert "fold 0" in capsys.readouterr().out


def test_slim_copy_trains_without_evaluation_arrays_and_carries_init_models(tmp_path, capsys):
    data = tmp_path / "data"
    _pack(data / "packed")
    for npz_path in sorted((data / "packed").glob("c*.npz")):  # the real cases get their 1 mm arrays, as prepare
        with np.load(npz_path) as npz:
            arrays = dict(npz)
        if "img2" in arrays:
            arrays.update(img1=np.ones((32, 32, 32), np.float16), lab1=np.zeros((32, 32, 32), np.int16),
                          affine1=np.eye(4))
        np.savez(npz_path, **arrays)
    source_state = tree_state(data)
    model = tiny_wholebrain_checkpoint(tmp_path / "models" / "tiny-seven", protocol="cerebrum7")
    out = tmp_path / "slim"
    assert train_main(["slim", str(data), str(out), "--folders", "packed", "--init", str(model)]) == 0
    assert "packed 4 cases, 1 models to start from" in capsys.readouterr().out
    assert tree_state(data) == source_state  # the packs are read, never written
    for npz_path in sorted((out / "packed").glob("*.npz")):
        with np.load(npz_path) as slim, np.load(data / "packed" / npz_path.name) as full:
            assert not {"img1", "lab1", "affine1"} & set(slim.files)
            for key in slim.files:
                np.testing.assert_array_equal(slim[key], full[key])
    assert json.loads((out / "packed" / "index.json").read_text()) == \
        json.loads((data / "packed" / "index.json").read_text())
    _, manifest = load_checkpoint(out / "init" / "tiny-seven")
    assert manifest["name"] == "tiny-seven"
    # a run trains from the slim copy and starts from the copied model
    cfg_path = _config(tmp_path, iterations=1)
    cfg_path.write_text(cfg_path.read_text().replace('folders = ["packed"]', 'folders = ["packed"]\n'
                                                     'init_from = "init/tiny-seven"'))
    assert train_main(["fit", str(cfg_path), "--data", str(out), "--run", str(tmp_path / "r"), "--threads", "1"]) == 0
    # bad input: a folder that is not packed, a copy over the size limit, a copy inside the data
    assert train_main(["slim", str(data), str(tmp_path / "s2"), "--folders", "missing"]) == 2
    assert "missing/index.json: no packed folder here" in capsys.readouterr().err
    assert train_main(["slim", str(data), str(tmp_path / "s3"), "--folders", "packed", "--max-mib", "0.001"]) == 2
    assert "MiB, more than the 0.001 MiB allowed" in capsys.readouterr().err
    assert train_main(["slim", str(data), str(data / "inside"), "--folders", "packed"]) == 2
    assert "must be outside the packed data" in capsys.readouterr().err


def test_protocol_of_training_configs_matches_models():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs" / "train"
    for path in sorted(root.glob("*.toml")):
        cfg = TrainConfig.from_toml(path)
        assert cfg.model["n_classes"] == len(load_protocol(cfg.protocol)), path


def test_config_extends_a_base_file(tmp_path):
    (tmp_path / "base.toml").write_text('name = "base"\narchitecture = "unet"\nprotocol = "aseg"\n'
                                        '[model]\nn_classes = 33\nbase_filters = 8\n'
                                        '[optim]\nlr = 0.003\niterations = 500\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\nname = "child"\n'
                                         '[model]\nbase_filters = 16\n[optim]\niterations = 5000\n')
    cfg = TrainConfig.from_toml(tmp_path / "child.toml")
    assert (cfg.name, cfg.architecture, cfg.lr, cfg.iterations) == ("child", "unet", 0.003, 5000)
    assert cfg.model == {"n_classes": 33, "base_filters": 16}
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(ValueError, match="loops back"):
        TrainConfig.from_toml(tmp_path / "loop.toml")


def test_fit_segnet_tiny(tmp_path):
    from bids_app.training.trainer import fit_segnet

    _pack(tmp_path / "data" / "packed")
    text = _config(tmp_path, iterations=3).read_text()
    text = text.replace('architecture = "unet"', 'architecture = "segnet"').replace(
        "base_filters = 2\ndepth = 1\n",
        "patch_3d = 3\npatch_2d = 13\ncompressed_size = 13\ncompressed_scale = 1\nconv_channels = [2, 3]\n"
        "conv_kernel = 3\nfc_3d = [8]\nfc_hidden = [8]\n")
    text = text.replace("[optim]\n", "[optim]\nbatch_size = 16\n")
    path = tmp_path / "segnet.toml"
    path.write_text(text)
    cfg = TrainConfig.from_toml(path)
    out = fit_segnet(cfg, tmp_path / "data", tmp_path / "run", fold=1, num_threads=1)
    model, manifest = load_checkpoint(out)
    assert manifest["architecture"] == "segnet" and manifest["training"]["iterations"] == 3
    assert manifest["training"]["test_subjects"]
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["history"][-1]["iteration"] == 3


def test_initialise_from_coarser_protocol(tmp_path):
    from bids_app.models.checkpoint import save_checkpoint
    from bids_app.models.unet import UNet3D
    from bids_app.training.trainer import initialise_from

    aseg = load_protocol("aseg")
    dkt = load_protocol("dkt-aseg")
    torch.manual_seed(0)
    coarse = UNet3D(in_channels=1, n_classes=len(aseg), base_filters=2, depth=1)
    save_checkpoint(coarse, tmp_path / "coarse", {
        "version": "1", "label_protocol": aseg.as_manifest(),
        "input_channels": [{"name": "T1w", "normalisation": "percentile99"}], "voxel_size_mm": 2.0,
        "training": {"data": "x", "licence": "x", "seed": 0}, "metrics": {}})
    fine = UNet3D(in_channels=1, n_classes=len(dkt), base_filters=2, depth=1)
    initialise_from(fine, tmp_path / "coarse", dkt)
    coarse.eval()
    fine.eval()
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        p_coarse = torch.softmax(coarse(x), 1)
        p_fine = torch.softmax(fine(x), 1)
    # the fine classes of each coarse class share exactly its probability at the start
    from bids_app.core.labels import merged_probabilities

    merged = merged_probabilities(p_fine[0].numpy(), dkt, aseg)
    assert np.allclose(merged, p_coarse[0].numpy(), atol=1e-5)


def test_budget_iterations_fills_the_rest_of_the_budget():
    # 50 iterations took 10 s: 0.2 s each; 90 s are left -> 450 more
    assert budget_iterations(0, 50, 10.0, 100.0, 10_000) == 500
    # a resumed run counts from where it started; the configured count is a ceiling
    assert budget_iterations(1000, 50, 10.0, 100.0, 10_000) == 1500
    assert budget_iterations(0, 50, 10.0, 100.0, 300) == 300
    # a budget already spent still allows one more iteration, so the run ends with a final model
    assert budget_iterations(0, 50, 120.0, 100.0, 10_000) == 51
    with pytest.raises(ValueError):
        budget_iterations(0, 0, 1.0, 100.0, 10)


def test_fit_with_time_budget_cuts_the_run_and_records_it(tmp_path, monkeypatch):
    import bids_app.training.trainer as trainer

    class Clock:  # every reading of the clock advances it by 0.5 s
        now = 0.0

        def time(self):
            Clock.now += 0.5
            return Clock.now

    monkeypatch.setattr(trainer, "time", Clock())
    monkeypatch.setattr(trainer, "BUDGET_PROBE_ITERATIONS", 2)
    _pack(tmp_path / "data" / "packed")
    cfg = TrainConfig.from_toml(_config(tmp_path, iterations=1000))
    out = fit(cfg, tmp_path / "data", tmp_path / "run", num_threads=1, time_budget=8.0)
    _, manifest = load_checkpoint(out)
    done = manifest["training"]["iterations"]
    assert out.name == "final" and 3 <= done < 20
    assert manifest["training"]["config"]["iterations"] == done
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["iteration"] == done
    # the schedule was stretched over the cut run: by its end the poly decay has taken the learning rate
    # below half of its peak (over the configured 1000 iterations it would still be near the peak)
    assert state["history"][-1]["lr"] < 0.01 / 2
