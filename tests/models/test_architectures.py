"""The three dense architectures (CEREBRUM, 3D U-Net, DPN) against the SegmentationNet contract.

Tiny widths and volumes on CPU; parameter counts use the paper widths (construction only).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from bids_app.models import registry
from bids_app.models.cerebrum import Cerebrum
from bids_app.models.dpn import DPN
from bids_app.models.unet import UNet3D

N_CLASSES = 3

#: registry name (a "-variant" suffix for other constructor arguments) -> (class, tiny constructor kwargs)
TINY = {
    "cerebrum": (Cerebrum, dict(base_filters=4)),
    "unet": (UNet3D, dict(base_filters=4, depth=4)),
    "unet-inputskip": (UNet3D, dict(base_filters=4, depth=4, input_skip=True)),
    "dpn": (DPN, dict(base_filters=4)),
}


def tiny(name: str, in_channels: int = 1, **extra) -> nn.Module:
    cls, kwargs = TINY[name]
    torch.manual_seed(0)
    return cls(in_channels=in_channels, n_classes=N_CLASSES, **{**kwargs, **extra})


def volume(in_channels: int = 1, size=(32, 32, 32), n: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, in_channels, *size), generator=torch.Generator().manual_seed(seed))


def as_tensors(state) -> list[torch.Tensor]:
    """Flatten a prefix output (tensor or nested tuples of tensors) to a list of tensors."""
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for item in state for t in as_tensors(item)]


def dropouts_to_train(net: nn.Module, p: float | None = None) -> None:
    for m in net.dropout_modules():
        if p is not None:
            m.p = p
        m.train()


names = pytest.mark.parametrize("name", sorted(TINY))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny volumes gain nothing from threads, and OpenMP spinning is slow on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- shapes and sizes --------------------------------------------------------------------------


@names
@pytest.mark.parametrize("in_channels", [1, 2])
def test_forward_shape(name, in_channels):
    net = tiny(name, in_channels).eval()
    x = volume(in_channels)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (1, N_CLASSES, 32, 32, 32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert net.kind == "dense"


@pytest.mark.parametrize("name, divisor", [("cerebrum", 8), ("unet", 16), ("unet-inputskip", 16), ("dpn", 8)])
def test_size_divisor(name, divisor):
    """Multiples of size_divisor (also anisotropic, not powers of two) work; others raise."""
    net = tiny(name).eval()
    assert net.size_divisor == divisor
    size = (2 * divisor, 3 * divisor, divisor)
    with torch.no_grad():
        assert net(volume(size=size)).shape == (1, N_CLASSES, *size)
        with pytest.raises(ValueError, match="multiple of"):
            net(volume(size=(2 * divisor, 3 * divisor, divisor + 4)))
        with pytest.raises(ValueError, match="expected input"):
            net(volume(in_channels=2, size=size))


def test_size_divisor_follows_configuration():
    assert UNet3D(base_filters=2, depth=3).size_divisor == 8
    assert UNet3D(base_filters=2, depth=2).size_divisor == 4
    assert DPN(base_filters=2, levels=3).size_divisor == 4
    net = DPN(in_channels=1, n_classes=2, base_filters=2, levels=3).eval()
    with torch.no_grad():
        assert net(volume(size=(12, 8, 4))).shape == (1, 2, 12, 8, 4)


# --- parameter counts --------------------------------------------------------------------------


def test_cerebrum_paper_parameter_count():
    """The paper quotes ~5 M parameters; base_filters=48 gives 4,931,432 (1 -> 8 channels)."""
    net = Cerebrum.paper(in_channels=1, n_classes=8)
    n = net.n_parameters()
    assert n == 4_931_432
    assert abs(n - 5_000_000) <= 0.15 * 5_000_000
    assert Cerebrum().config == net.config  # defaults are the paper configuration


def test_dpn_is_about_a_fifth_of_the_deepceres_unet():
    """DeepCERES: DPN (32 filters at every scale) ~1/5 of its U-Net (F=16 doubling).

    The comparison is at the DeepCERES U-Net size (UNet3D.deepceres: F=16, depth 3); against
    the Zopes defaults (F=32, depth 4, 22.6 M) the DPN is only ~1.4 %.
    """
    dpn = DPN(in_channels=1, n_classes=14).n_parameters()
    unet_deepceres = UNet3D.deepceres(in_channels=1, n_classes=14).n_parameters()
    unet_zopes = UNet3D(in_channels=1, n_classes=14).n_parameters()
    assert dpn == 309_198
    assert unet_deepceres == 1_401_486
    assert unet_zopes == 22_578_702
    assert 0.1 <= dpn / unet_deepceres <= 0.3
    assert dpn / unet_zopes < 0.02


# --- configuration round trip ------------------------------------------------------------------


@names
def test_rebuild_from_config(name):
    net = tiny(name, in_channels=2, dropout=0.3, spatial_dropout=True)
    clone = type(net)(**net.config)
    assert clone.config == net.config
    ref = {k: v.shape for k, v in net.state_dict().items()}
    assert {k: v.shape for k, v in clone.state_dict().items()} == ref
    clone.load_state_dict(net.state_dict())
    net.eval()
    clone.eval()
    x = volume(2)
    with torch.no_grad():
        assert torch.equal(net(x), clone(x))
    assert all(isinstance(m, nn.Dropout3d) and m.p == 0.3 for m in clone.dropout_modules())


@names
def test_registry_builds(name):
    cls, kwargs = TINY[name]
    arch = name.split("-")[0]
    net = registry.build(arch, in_channels=1, n_classes=N_CLASSES, **kwargs)
    assert type(net) is cls and registry.architecture_class(arch) is cls


def test_unet_input_skip_reaches_the_last_decoder():
    """The input is concatenated to the full-resolution decoder block only; the default U-Net's
    config (and so every manifest written before the option existed) does not name it."""
    plain, skip = tiny("unet", in_channels=3), tiny("unet-inputskip", in_channels=3)
    assert "input_skip" not in plain.config and skip.config["input_skip"] is True
    assert plain.decoders[0][0].in_channels == 2 * 4
    assert skip.decoders[0][0].in_channels == 2 * 4 + 3
    assert [d[0].in_channels for d in skip.decoders[1:]] == [d[0].in_channels for d in plain.decoders[1:]]
    # the input's gradient reaches it through the skip: zero the first encoder block and the
    # output still depends on the input
    with torch.no_grad():
        for p in skip.encoders[0].parameters():
            p.zero_()
    x = volume(3).requires_grad_(True)
    skip.eval()(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_models_package_does_not_import_torch():
    code = "import sys, bids_app.models, bids_app.models.registry; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- dropout and MC split ----------------------------------------------------------------------


def test_dropout_placement():
    unet = tiny("unet")
    assert len(unet.dropout_modules()) == 2 * 4  # after every encoder and decoder block
    assert not [m for m in unet.bottleneck.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert all(m.p == 0.2 for m in UNet3D(base_filters=2).dropout_modules())
    assert len(tiny("dpn").dropout_modules()) == 3  # 1/8, 1/4, 1/2
    assert all(m.p == 0.25 for m in DPN(base_filters=2).dropout_modules())
    assert len(tiny("cerebrum").dropout_modules()) == 5  # bottleneck x3, level-2 decoder x2
    assert all(m.p == 0.1 for m in Cerebrum(base_filters=2).dropout_modules())


@names
def test_split_for_mc_matches_forward(name):
    net = tiny(name).eval()
    x = volume()
    prefix, suffix = net.split_for_mc()
    with torch.no_grad():
        full = net(x)
        state = prefix(x)
        assert torch.equal(suffix(state), full)
        assert torch.equal(suffix(state), full)  # the prefix output is reusable


@names
def test_prefix_has_no_dropout(name):
    net = tiny(name).eval()
    x = volume()
    prefix, suffix = net.split_for_mc()
    calls = []
    for m in net.dropout_modules():
        m.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        reference = [t.clone() for t in as_tensors(prefix(x))]
        dropouts_to_train(net, p=0.9)
        state = prefix(x)
        assert not calls  # no dropout module runs inside the prefix
        got = as_tensors(state)
        assert len(got) == len(reference) and all(torch.equal(a, b) for a, b in zip(got, reference))
        # MC suffix samples (dropout active) leave the shared prefix output untouched
        suffix(state)
        suffix(state)
        assert calls
        assert all(torch.equal(a, b) for a, b in zip(as_tensors(state), reference))


@names
def test_mc_variation(name):
    net = tiny(name).eval()
    x = volume()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        dropouts_to_train(net)
        torch.manual_seed(0)
        a, b = net(x), net(x)
        assert not torch.equal(a, b)
        # BN (U-Net, DPN) stays in eval mode: only the dropout layers are stochastic
        assert all(not m.training for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        prefix, suffix = net.split_for_mc()
        state = prefix(x)
        assert not torch.equal(suffix(state), suffix(state))


@names
def test_gradients_flow(name):
    net = tiny(name).train()
    x = volume(n=1)
    target = torch.randint(0, N_CLASSES, (1, 32, 32, 32), generator=torch.Generator().manual_seed(2))
    loss = nn.functional.cross_entropy(net(x), target)
    loss.backward()
    missing = [k for k, p in net.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())
