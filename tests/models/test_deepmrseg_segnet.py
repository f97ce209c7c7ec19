"""DeepMRSeg (3D U-Net with ResNet/ResInc blocks) and SegNet (per-voxel multi-pathway network).

Tiny configurations on the CPU; the whole file runs in well under a minute.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bids_app.models import registry  # noqa: E402
from bids_app.models.deepmrseg import DeepMRSeg, ResIncBlock  # noqa: E402
from bids_app.models.segnet import (  # noqa: E402
    DenseOrthoFeatures,
    SegNet,
    centroid_distances,
    estimate_centroids,
    extract_patches,
)

TINY_DMR = dict(in_channels=1, n_classes=3, base_filters=8, depth=3, dropout=0.1)
SMALL_SEGNET = dict(
    in_channels=1,
    n_classes=5,
    patch_3d=3,
    patch_2d=11,
    compressed_size=11,
    compressed_scale=3,
    conv_channels=(4, 6),
    conv_kernel=3,
    pool=2,
    fc_3d=(16,),
    fc_hidden=(32, 32),
    dropout=0.2,
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny inputs gain nothing from threads; OpenMP spinning is slow on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _dropouts(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def _mc_mode(net: nn.Module) -> None:
    net.eval()
    for m in _dropouts(net):
        m.train()


# ----------------------------------------------------------------------------- DeepMRSeg


@pytest.mark.parametrize("in_channels", [1, 2])
def test_deepmrseg_forward_shape(in_channels):
    torch.manual_seed(0)
    net = DeepMRSeg(**{**TINY_DMR, "in_channels": in_channels}).eval()
    assert net.size_divisor == 8
    with torch.no_grad():
        out = net(torch.randn(1, in_channels, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32)
    with pytest.raises(ValueError):
        net(torch.randn(1, in_channels, 32, 32, 36))


def test_resinc_block_branch_structure():
    block = ResIncBlock(16)
    assert len(block.branches) == 4
    for n_stacked, branch in enumerate(block.branches):
        convs = [m for m in branch.modules() if isinstance(m, nn.Conv3d)]
        assert [c.kernel_size for c in convs] == [(1, 1, 1)] + [(3, 3, 3)] * n_stacked
        assert convs[0].in_channels == 16
        assert all(c.out_channels == 16 // 4 for c in convs)  # f/4 features per branch
    merge = [m for m in block.merge.modules() if isinstance(m, nn.Conv3d)]
    assert len(merge) == 1 and merge[0].kernel_size == (1, 1, 1)
    assert (merge[0].in_channels, merge[0].out_channels) == (16, 16)
    x = torch.randn(1, 16, 6, 6, 6)
    assert block.eval()(x).shape == x.shape


def _resinc_params(c: int) -> int:
    w = c // 4
    branch_1x1 = 4 * (c * w + 2 * w)  # conv (no bias) + BN
    stacked_3x3 = 6 * (w * w * 27 + 2 * w)  # 0+1+2+3 convs
    merge = c * c + 2 * c
    return branch_1x1 + stacked_3x3 + merge


def test_deepmrseg_tiny_parameter_count_2671():
    """in 1, 3 classes, f=4, depth 1, counted by hand (BN has 2 parameters per channel)."""
    f = 4
    projection = 1 * f + 2 * f
    pre_resnet = 2 * (f * f * 27 + 2 * f)
    down = f * 2 * f + 2 * 2 * f
    enc = _resinc_params(2 * f)
    up = 2 * f * f + 2 * f  # transposed 1x1x1, 2f -> f, + BN
    dec = _resinc_params(2 * f)  # concat(up f, skip f)
    head = 2 * f * 3 + 3
    expected = projection + pre_resnet + down + enc + up + dec + head
    assert expected == 2671
    assert DeepMRSeg(in_channels=1, n_classes=3, base_filters=f, depth=1).n_parameters() == expected


def test_deepmrseg_default_parameter_count_2230674():
    assert DeepMRSeg(in_channels=1, n_classes=2).n_parameters() == 2_230_674


def test_deepmrseg_concatenated_skips_and_quarter_upsampling():
    net = DeepMRSeg(**TINY_DMR)
    f = TINY_DMR["base_filters"]
    # bottleneck (8f) -> 4f, then decoder levels of 2 F_i channels -> F_{i-1} = one fourth
    assert [(u[0].in_channels, u[0].out_channels) for u in net.up] == [(8 * f, 4 * f), (8 * f, 2 * f), (4 * f, f)]
    assert [blk.merge[0].out_channels for blk in net.decoder] == [8 * f, 4 * f, 2 * f]
    assert [d[0].stride for d in net.down] == [(2, 2, 2)] * 3
    assert all(d[0].kernel_size == (1, 1, 1) for d in net.down)


def test_deepmrseg_rebuild_from_config():
    torch.manual_seed(0)
    net = DeepMRSeg(**TINY_DMR).eval()
    clone = type(net)(**net.config)
    clone.load_state_dict(net.state_dict())
    clone.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), clone(x))
    assert clone.config == net.config


def test_deepmrseg_split_for_mc_exact_and_dropout_free_prefix():
    torch.manual_seed(0)
    net = DeepMRSeg(**TINY_DMR).eval()
    prefix, suffix = net.split_for_mc()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(suffix(prefix(x)), net(x))
        _mc_mode(net)  # dropout on: the prefix must not change
        a, b = prefix(x), prefix(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    for part in (net.projection, net.pre_encoding, net.down[0], net.encoder[0]):
        assert not _dropouts(part)


def test_deepmrseg_dropout_varies_in_train_mode():
    torch.manual_seed(0)
    net = DeepMRSeg(**{**TINY_DMR, "dropout": 0.3})
    _mc_mode(net)
    x = torch.randn(1, 1, 16, 16, 16)
    prefix, suffix = net.split_for_mc()
    with torch.no_grad():
        feats = prefix(x)
        s1, s2 = suffix(feats), suffix(feats)
        f1, f2 = net(x), net(x)
    assert not torch.allclose(s1, s2)
    assert not torch.allclose(f1, f2)
    assert len(net.dropout_modules()) == 2 * TINY_DMR["depth"]


def test_deepmrseg_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = DeepMRSeg(**TINY_DMR).train()
    loss = net(torch.randn(2, 1, 16, 16, 16)).logsumexp(dim=1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# ----------------------------------------------------------------------------- SegNet patches


def _naive_value(vol, c, z, y, x):
    d, h, w = vol.shape[1:]
    if 0 <= z < d and 0 <= y < h and 0 <= x < w:
        return float(vol[c, z, y, x])
    return 0.0


def _naive_patches(vol, coord, a, b, cs, s):
    """Patches of one voxel by explicit loops over the patch elements (zero outside)."""
    z, y, x = coord
    ch = vol.shape[0]
    p3 = torch.zeros(ch, a, a, a)
    r = a // 2
    for c in range(ch):
        for i in range(a):
            for j in range(a):
                for k in range(a):
                    p3[c, i, j, k] = _naive_value(vol, c, z - r + i, y - r + j, x - r + k)
    ortho = torch.zeros(3, ch, b, b)
    r = b // 2
    for c in range(ch):
        for u in range(b):
            for v in range(b):
                ortho[0, c, u, v] = _naive_value(vol, c, z, y - r + u, x - r + v)
                ortho[1, c, u, v] = _naive_value(vol, c, z - r + u, y, x - r + v)
                ortho[2, c, u, v] = _naive_value(vol, c, z - r + u, y - r + v, x)
    comp = torch.zeros(3, ch, cs, cs)
    r = (cs * s) // 2
    for c in range(ch):
        for u in range(cs):
            for v in range(cs):
                acc = [0.0, 0.0, 0.0]
                for du in range(s):
                    for dv in range(s):
                        pu, pv = -r + s * u + du, -r + s * v + dv
                        acc[0] += _naive_value(vol, c, z, y + pu, x + pv)
                        acc[1] += _naive_value(vol, c, z + pu, y, x + pv)
                        acc[2] += _naive_value(vol, c, z + pu, y + pv, x)
                for k in range(3):
                    comp[k, c, u, v] = acc[k] / (s * s)
    return p3, ortho, comp


@pytest.mark.parametrize("channels", [1, 2])
def test_extract_patches_matches_naive_loop(channels):
    torch.manual_seed(0)
    vol = torch.rand(channels, 9, 10, 11)
    coords = torch.tensor([[0, 0, 0], [8, 9, 10], [4, 5, 5], [0, 9, 3], [8, 0, 10], [2, 7, 0]])
    a, b, cs, s = 3, 5, 3, 3
    got = extract_patches(vol if channels > 1 else vol[0], coords, a, b, cs, s)
    assert got["patch3d"].shape == (6, channels, a, a, a)
    assert got["ortho"].shape == (6, 3, channels, b, b)
    assert got["compressed"].shape == (6, 3, channels, cs, cs)
    for n, coord in enumerate(coords.tolist()):
        p3, ortho, comp = _naive_patches(vol, coord, a, b, cs, s)
        assert torch.equal(got["patch3d"][n], p3)
        assert torch.equal(got["ortho"][n], ortho)
        torch.testing.assert_close(got["compressed"][n], comp, rtol=0, atol=1e-6)


def test_compressed_patch_is_mean_of_3x3_blocks_of_the_large_patch():
    torch.manual_seed(1)
    vol = torch.rand(20, 20, 20)
    coords = torch.tensor([[10, 10, 10], [1, 18, 5]])
    c, s = 5, 3
    got = extract_patches(vol, coords, patch_3d=1, patch_2d=c * s, compressed_size=c, compressed_scale=s)
    # the (c*s)^2 orthogonal patch, averaged over s x s blocks, is the compressed patch
    large = got["ortho"]  # (N, 3, 1, 15, 15)
    blocks = large.reshape(2, 3, 1, c, s, c, s).mean(dim=(4, 6))
    torch.testing.assert_close(got["compressed"], blocks, rtol=0, atol=1e-6)


def test_extract_patches_rejects_outside_coordinates():
    with pytest.raises(ValueError):
        extract_patches(torch.rand(5, 5, 5), torch.tensor([[5, 0, 0]]), 3, 3, 3, 3)


def test_centroid_estimation_and_distances():
    coords = torch.tensor([[0, 0, 0], [2, 0, 0], [0, 4, 0], [1, 1, 1], [5, 5, 5]])
    labels = torch.tensor([1, 1, 3, 0, 3])
    centroids, present = estimate_centroids(coords, labels, n_regions=3)
    assert present.tolist() == [True, False, True]
    torch.testing.assert_close(centroids[0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(centroids[2], torch.tensor([2.5, 4.5, 2.5]))
    dist = centroid_distances(torch.tensor([[1, 0, 3]]), centroids, present)
    torch.testing.assert_close(dist, torch.tensor([[3.0, 0.0, (1.5**2 + 4.5**2 + 0.5**2) ** 0.5]]))


# ----------------------------------------------------------------------------- SegNet network


def _inputs(net: SegNet, n: int, with_centroids: bool = True) -> dict:
    c = net.config
    a, b, cs = c["patch_3d"], c["patch_2d"], c["compressed_size"]
    return {
        "patch3d": torch.rand(n, 1, a, a, a),
        "ortho": torch.rand(n, 3, 1, b, b),
        "compressed": torch.rand(n, 3, 1, cs, cs),
        "centroids": torch.rand(n, net.n_centroids) * 50 if with_centroids else None,
    }


def test_segnet_forward_shape_dict_and_tuple():
    torch.manual_seed(0)
    net = SegNet(**SMALL_SEGNET).eval()
    batch = _inputs(net, 7)
    with torch.no_grad():
        out = net(batch)
        assert out.shape == (7, 5)
        assert torch.equal(net(tuple(batch[k] for k in ("patch3d", "ortho", "compressed", "centroids"))), out)
        assert net({**batch, "centroids": None}).shape == (7, 5)
        with pytest.raises(ValueError):
            net({**batch, "centroids": torch.zeros(7, 3)})
    assert net.kind == "patch"
    assert net.n_centroids == 4


def _conv_pool_params(cin, cout, k):
    return cin * cout * k * k + cout


def test_segnet_orientations_share_one_module():
    net = SegNet(**SMALL_SEGNET)  # paper: the first 2DconvPool layer is shared
    for path in (net.ortho_path, net.compressed_path):
        expected = _conv_pool_params(1, 4, 3) + 3 * _conv_pool_params(4, 6, 3)
        assert sum(p.numel() for p in path.parameters()) == expected
    calls = []
    shared_conv = net.ortho_path.shared[0][0]
    shared_conv.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        net.eval()(_inputs(net, 5))
    assert calls == [3 * 5]  # one module, applied to the three orientations of 5 voxels

    whole = SegNet(**{**SMALL_SEGNET, "shared_layers": 2})  # the whole 2D pathway shared
    expected = _conv_pool_params(1, 4, 3) + _conv_pool_params(4, 6, 3)
    assert sum(p.numel() for p in whole.ortho_path.parameters()) == expected
    separate = SegNet(**{**SMALL_SEGNET, "shared_layers": 0})
    assert sum(p.numel() for p in separate.ortho_path.parameters()) == 3 * expected


def test_segnet_paper_parameter_count():
    net = SegNet()
    assert net.n_features == 3 * 800 + 3 * 800 + 1000 + 134
    assert net.n_parameters() == 30_563_475
    # the paper's 30,565,555 counts each shared first layer (520 parameters) once per orientation
    assert net.n_parameters() + 2 * 2 * 520 == 30_565_555


def test_segnet_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = SegNet(**SMALL_SEGNET).train()
    labels = torch.randint(0, 5, (16,))
    nn.functional.cross_entropy(net(_inputs(net, 16)), labels).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_segnet_rebuild_from_config():
    torch.manual_seed(0)
    net = SegNet(**SMALL_SEGNET).eval()
    clone = type(net)(**net.config)
    clone.load_state_dict(net.state_dict())
    clone.eval()
    batch = _inputs(net, 4)
    with torch.no_grad():
        assert torch.equal(net(batch), clone(batch))


def test_segnet_split_for_mc():
    torch.manual_seed(0)
    net = SegNet(**SMALL_SEGNET).eval()
    prefix, suffix = net.split_for_mc()
    batch = _inputs(net, 6)
    with torch.no_grad():
        feats = prefix(batch)
        assert feats.shape == (6, net.n_features)
        assert torch.equal(suffix(feats), net(batch))
        _mc_mode(net)
        assert torch.equal(prefix(batch), feats)  # no dropout, no noise in the prefix
        assert not torch.allclose(suffix(feats), suffix(feats))
    assert not _dropouts(net.ortho_path) and not _dropouts(net.compressed_path) and not _dropouts(net.patch3d_path)


def test_dense_pathway_features_equal_patch_features():
    torch.manual_seed(0)
    net = SegNet(**SMALL_SEGNET).eval()
    vol = torch.rand(14, 15, 16)
    extractor = net.patch_extractor(vol)
    coords = torch.nonzero(torch.ones(14, 15, 16))[::5]  # includes border voxels
    with torch.no_grad():
        patches = extractor(coords)
        expected = torch.cat([net.ortho_path(patches["ortho"]), net.compressed_path(patches["compressed"])], dim=1)
        dense = DenseOrthoFeatures(net, extractor, coords)(coords)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- SegNet inference


def _sphere(shape=(24, 24, 24), radius=9.0):
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    centre = torch.tensor([(s - 1) / 2 for s in shape])[:, None, None, None]
    return ((grid - centre) ** 2).sum(0) <= radius**2


def _foreground_net(**overrides) -> SegNet:
    torch.manual_seed(0)
    net = SegNet(**{**SMALL_SEGNET, **overrides}).eval()
    with torch.no_grad():
        net.head[-1].bias[0] = -20.0  # random weights: make stage 1 label regions, not background
    return net


def test_predict_volume_probabilities_inside_and_background_outside():
    net = _foreground_net()
    mask = _sphere()
    vol = torch.rand(24, 24, 24) * mask
    probs = net.predict_volume(vol, mask=mask, batch_size=512)
    assert probs.shape == (5, 24, 24, 24)
    torch.testing.assert_close(probs.sum(0)[mask], torch.ones(int(mask.sum())))
    assert bool((probs[:, mask] >= 0).all())
    assert torch.equal(probs[0][~mask], torch.ones(int((~mask).sum())))
    assert torch.equal(probs[1:][:, ~mask], torch.zeros(4, int((~mask).sum())))
    assert not net.training
    # default mask = non-zero voxels: same as passing it
    assert torch.equal(net.predict_volume(vol, batch_size=512), probs)


def test_predict_volume_dense_equals_patch_path_and_autocast_runs():
    net = _foreground_net()
    mask = _sphere((16, 16, 16), 5.0)
    vol = torch.rand(16, 16, 16)
    dense = net.predict_volume(vol, mask=mask, slab=3, batch_size=100)
    patches = net.predict_volume(vol, mask=mask, dense=False, batch_size=100)
    torch.testing.assert_close(dense, patches, rtol=1e-4, atol=1e-5)
    bf16 = net.predict_volume(vol, mask=mask, autocast=True)
    torch.testing.assert_close(bf16.sum(0)[mask], torch.ones(int(mask.sum())))


def test_predict_volume_stage2_uses_centroids_estimated_from_stage1(monkeypatch):
    net = _foreground_net()
    mask = _sphere()
    torch.manual_seed(1)
    ramp = torch.arange(24.0).expand(24, 24, 24) / 4  # varied input -> several regions in stage 1
    vol = (ramp + torch.rand(24, 24, 24)) * mask
    coords = torch.nonzero(mask)

    seen_inputs = []  # centroid columns of the merged features entering the FC head, in order
    net.head[0].register_forward_pre_hook(lambda m, i: seen_inputs.append(i[0][:, -net.n_centroids :].clone()))
    estimates = []
    original = net.estimate_centroids

    def spy(c, labels):
        result = original(c, labels)
        estimates.append((labels.clone(), result))
        return result

    monkeypatch.setattr(net, "estimate_centroids", spy)
    net.predict_volume(vol, mask=mask, batch_size=300)
    assert len(estimates) == 1
    labels, (centroids, present) = estimates[0]
    assert int(present.sum()) >= 2

    stage_inputs = torch.cat(seen_inputs)
    n = coords.shape[0]
    assert stage_inputs.shape == (2 * n, 4)
    stage1, stage2 = stage_inputs[:n], stage_inputs[n:]
    assert torch.equal(stage1, torch.zeros_like(stage1))  # neutral value in stage 1
    scale = net.config["distance_scale"]
    torch.testing.assert_close(stage2, scale * centroid_distances(coords, centroids, present))
    assert not torch.equal(stage1, stage2)

    # the labels fed to the centroid estimate are stage 1's argmax
    stage1_only = net.predict_volume(vol, mask=mask, batch_size=300, refinements=0)
    assert torch.equal(labels, stage1_only[:, mask].argmax(dim=0))


def test_predict_volume_with_separate_stage1_network():
    stage1 = _foreground_net(n_centroids=0)
    assert stage1.n_features == SegNet(**SMALL_SEGNET).n_features - 4
    net = _foreground_net()
    mask = _sphere((16, 16, 16), 5.0)
    probs = net.predict_volume(torch.rand(16, 16, 16), mask=mask, stage1_net=stage1)
    torch.testing.assert_close(probs.sum(0)[mask], torch.ones(int(mask.sum())))


# ----------------------------------------------------------------------------- registry


def test_registry_builds_both():
    dmr = registry.build("deepmrseg", **TINY_DMR)
    seg = registry.build("segnet", **SMALL_SEGNET)
    assert isinstance(dmr, DeepMRSeg) and dmr.kind == "dense"
    assert isinstance(seg, SegNet) and seg.kind == "patch"
    assert registry.architecture_class("segnet") is SegNet


def test_centroid_input_noise_and_blanking_only_in_training():
    from bids_app.models.segnet import CentroidInput

    torch.manual_seed(0)
    d = torch.rand(64, 4) * 100
    module = CentroidInput(noise_std=5.0, blank=1.0, scale=0.01)
    assert torch.equal(module.train()(d), torch.zeros_like(d))  # every sample blanked
    torch.testing.assert_close(module.eval()(d), d * 0.01)
    noisy = CentroidInput(noise_std=5.0, blank=0.0, scale=1.0).train()(d)
    assert not torch.allclose(noisy, d) and (noisy - d).abs().mean() < 10
