"""Data augmentation and SynthSeg-style domain randomisation, in torch (CPU or GPU).

All functions take and return tensors shaped ``(C, D, H, W)`` on any device and draw their random
numbers from an explicit ``torch.Generator`` (on the CPU, so a seed gives the same draws on any
device). A training sample is made by :func:`make_sample`:

1. a random spatial transform (rotation, scaling, translation of the crop centre, smooth elastic
   displacement, left-right flip with the protocol's label swap) sampled directly at the crop size;
2. for a label-map case, an image synthesised from the generation labels: per label a random mean
   and standard deviation (Billot et al., SynthSeg), then partial-volume blur;
3. intensity corruption: bias field, gamma, blur, random low resolution along one axis, noise;
4. p99 normalisation inside the non-zero region, as the pipeline normalises real scans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms (all switched off with ``AugmentConfig.none()``)."""

    crop: tuple[int, int, int] = (64, 64, 64)
    rotation_deg: float = 12.0
    scale: float = 0.12
    elastic_vox: float = 1.5
    elastic_grid: int = 5
    flip: bool = True
    bias_std: float = 0.3
    gamma_std: float = 0.25
    blur_max_vox: float = 0.8
    lowres_prob: float = 0.25
    lowres_max_factor: float = 3.0
    noise_max: float = 0.05
    synth_mean_range: tuple[float, float] = (0.05, 1.0)
    synth_std_max: float = 0.08
    #: >= 0: the image is zeroed outside the target's foreground dilated by this many voxels (the
    #: lobule network of the cerebellum cascade sees the T1w masked by the hemisphere network's mask)
    mask_to_foreground: int = -1

    @classmethod
    def none(cls, crop=(64, 64, 64)) -> "AugmentConfig":
        return cls(crop=tuple(crop), rotation_deg=0.0, scale=0.0, elastic_vox=0.0, flip=False, bias_std=0.0,
                   gamma_std=0.0, blur_max_vox=0.0, lowres_prob=0.0, noise_max=0.0)


def _uniform(gen: torch.Generator, low: float, high: float, size=()) -> torch.Tensor:
    return torch.rand(size, generator=gen) * (high - low) + low


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    cx, cy, cz = torch.cos(angles)
    sx, sy, sz = torch.sin(angles)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def sample_grid(in_shape, cfg: AugmentConfig, gen: torch.Generator, center=None, device="cpu") -> tuple[torch.Tensor, bool]:
    """``grid_sample`` grid ``(1, d, h, w, 3)`` mapping the crop onto the input volume, and the flip flag."""
    crop = torch.tensor(cfg.crop, dtype=torch.float32)
    size = torch.tensor(in_shape, dtype=torch.float32)
    if center is None:
        center = (size - 1) / 2
    center = torch.as_tensor(center, dtype=torch.float32)
    angles = _uniform(gen, -1, 1, (3,)) * math.radians(cfg.rotation_deg)
    scales = 1 + _uniform(gen, -1, 1, (3,)) * cfg.scale
    matrix = _rotation(angles) @ torch.diag(scales)
    flip = bool(cfg.flip and torch.rand((), generator=gen) < 0.5)
    axes = [torch.arange(int(c), dtype=torch.float32) - (c - 1) / 2 for c in crop]
    out = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (d, h, w, 3) voxel offsets
    if flip:
        out[..., 0] = -out[..., 0]
    src = out @ matrix.T + center
    if cfg.elastic_vox > 0:
        n = cfg.elastic_grid
        coarse = torch.randn((1, 3, n, n, n), generator=gen) * cfg.elastic_vox
        disp = F.interpolate(coarse, size=tuple(int(c) for c in crop), mode="trilinear", align_corners=True)
        src = src + disp[0].permute(1, 2, 3, 0)
    norm = 2 * src / (size - 1).clamp(min=1) - 1
    grid = norm.flip(-1)[None]  # grid_sample wants (x=W, y=H, z=D)
    return grid.to(device), flip


def warp(volume: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample ``(C, D, H, W)`` at ``grid``; zeros outside."""
    return F.grid_sample(volume[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=True)[0]


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | list) -> torch.Tensor:
    """Separable Gaussian blur of ``(C, D, H, W)`` with per-axis sigmas in voxels."""
    out = x[None]
    for axis, s in enumerate(sigma):
        s = float(s)
        if s < 0.1:
            continue
        radius = max(1, int(math.ceil(3 * s)))
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / s) ** 2)
        k = k / k.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        c = out.shape[1]
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.view(shape).expand(c, 1, *shape[2:]).contiguous(),
                       groups=c)
    return out[0]


def synthesize(gen_labels: torch.Tensor, n_labels: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Random-contrast image ``(1, D, H, W)`` from generation labels (label 0 stays 0: brain-masked input)."""
    means = _uniform(gen, *cfg.synth_mean_range, (n_labels,))
    stds = _uniform(gen, 0.0, cfg.synth_std_max, (n_labels,))
    means[0] = 0.0
    stds[0] = 0.0
    lab = gen_labels.long().clamp(0, n_labels - 1)
    noise = torch.randn(lab.shape, generator=gen).to(lab.device)
    image = means.to(lab.device)[lab] + stds.to(lab.device)[lab] * noise
    sigma = _uniform(gen, 0.3, 1.0, (3,))
    return gaussian_blur(image.float()[None], sigma) * (lab > 0)[None]


def corrupt(image: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Bias field, gamma, blur, low resolution along one axis and noise; zero outside ``mask``."""
    dev = image.device
    x = image.clamp(min=0)
    if cfg.bias_std > 0:
        coarse = torch.randn((1, 1, 4, 4, 4), generator=gen) * cfg.bias_std * float(torch.rand((), generator=gen))
        field = F.interpolate(coarse, size=tuple(x.shape[1:]), mode="trilinear", align_corners=True)[0]
        x = x * torch.exp(field).to(dev)
    if cfg.gamma_std > 0:
        g = float(torch.exp(torch.randn((), generator=gen) * cfg.gamma_std))
        peak = x.amax().clamp(min=1e-6)
        x = (x / peak) ** g * peak
    if cfg.blur_max_vox > 0:
        x = gaussian_blur(x, _uniform(gen, 0.0, cfg.blur_max_vox, (3,)))
    if cfg.lowres_prob > 0 and float(torch.rand((), generator=gen)) < cfg.lowres_prob:
        axis = int(torch.randint(0, 3, (), generator=gen))
        factor = float(_uniform(gen, 1.5, cfg.lowres_max_factor))
        sigma = [0.0, 0.0, 0.0]
        sigma[axis] = factor / 2.355
        x = gaussian_blur(x, sigma)
        size = list(x.shape[1:])
        small = list(size)
        small[axis] = max(2, int(round(size[axis] / factor)))
        x = F.interpolate(F.interpolate(x[None], size=small, mode="trilinear", align_corners=True),
                          size=size, mode="trilinear", align_corners=True)[0]
    if cfg.noise_max > 0:
        level = float(_uniform(gen, 0.0, cfg.noise_max)) * float(x.amax())
        x = x + torch.randn(x.shape, generator=gen).to(dev) * level
    return x.clamp(min=0) * mask


def normalise(image: torch.Tensor, mask: torch.Tensor, percentile: float = 99.0, clip_max: float = 2.0) -> torch.Tensor:
    """The torch twin of :func:`bids_app.core.intensity.normalise_intensity`."""
    inside = image[mask > 0]
    if inside.numel() == 0:
        return image
    if inside.numel() > 4_000_000:
        inside = inside[:: inside.numel() // 4_000_000 + 1]
    ref = torch.quantile(inside.float(), percentile / 100.0).clamp(min=1e-6)
    return (image / ref).clamp(0.0, clip_max)


def make_sample(case: dict, cfg: AugmentConfig, gen: torch.Generator, lr_swap: torch.Tensor | None,
                device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented ``(image (1, d, h, w), classes (d, h, w))`` crop from a packed case.

    ``case`` holds tensors: ``classes`` ``(D, H, W)`` and either ``image`` ``(1, D, H, W)`` (real)
    or ``gen`` ``(D, H, W)`` with ``n_gen`` (label map).
    """
    classes = case["classes"]
    shape = classes.shape
    fg = case.get("foreground")
    if fg is not None and fg.shape[0] > 0:
        pick = fg[int(torch.randint(0, fg.shape[0], (), generator=gen))].float()
        # keep the crop mostly inside the volume: pull the centre towards the middle
        center = 0.5 * pick + 0.5 * (torch.tensor(shape, dtype=torch.float32) - 1) / 2
    else:
        center = None
    grid, flip = sample_grid(shape, cfg, gen, center=center, device=device)
    target = warp(classes[None].to(device), grid, "nearest")[0].long()
    if "gen" in case:
        gen_lab = warp(case["gen"][None].to(device), grid, "nearest")[0]
        mask = (gen_lab > 0).float()[None]
        image = synthesize(gen_lab, int(case["n_gen"]), cfg, gen)
    else:
        image = warp(case["image"].to(device), grid, "bilinear")
        mask = (image > 1e-3).float()
    image = corrupt(image, mask, cfg, gen)
    image = normalise(image, mask)
    if cfg.mask_to_foreground >= 0:
        k = int(cfg.mask_to_foreground)
        fg = (target > 0).float()[None, None]
        if k:
            fg = F.max_pool3d(fg, 2 * k + 1, stride=1, padding=k)
        image = image * fg[0]
    if "prior" in case:
        image = torch.cat([image, warp(case["prior"].to(device), grid, "bilinear")], dim=0)
    if flip and lr_swap is not None:
        target = lr_swap.to(target.device)[target]
    return image.float(), target
