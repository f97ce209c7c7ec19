"""Segmentation losses: cross-entropy + soft Dice, and the logarithmic Dice of DeepCERES."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_per_class(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Dice of every class over the batch, and which classes are present (target or prediction).

    ``logits`` ``(N, K, ...)``, ``target`` ``(N, ...)`` class positions.
    """
    k = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), k).movedim(-1, 1).float()
    dims = (0,) + tuple(range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (total + eps)
    present = onehot.sum(dims) > 0
    return dice, present


def dice_loss(logits: torch.Tensor, target: torch.Tensor, *, log: bool = False, include_background: bool = False) -> torch.Tensor:
    """``1 - mean Dice`` over the classes present in the target, or ``mean(-log Dice)`` (``log=True``)."""
    dice, present = soft_dice_per_class(logits, target)
    if not include_background:
        present = present.clone()
        present[0] = False
    if not present.any():
        return logits.sum() * 0.0
    d = dice[present]
    return (-torch.log(d.clamp(min=1e-6))).mean() if log else 1.0 - d.mean()


class SegmentationLoss(torch.nn.Module):
    """``ce_weight * CE + dice_weight * Dice loss``; ``dice="plain"`` or ``"log"`` (DeepCERES)."""

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, dice: str = "plain"):
        super().__init__()
        if dice not in ("plain", "log"):
            raise ValueError("dice must be 'plain' or 'log'")
        self.ce_weight, self.dice_weight, self.log = float(ce_weight), float(dice_weight), dice == "log"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros(())
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits.float(), target.long())
        if self.dice_weight:
            loss = loss + self.dice_weight * dice_loss(logits, target, log=self.log)
        return loss


def hard_dice(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Dice per class of two class-position volumes (NaN where both are empty)."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    p = torch.bincount(pred, minlength=n_classes)[:n_classes].double()
    t = torch.bincount(target, minlength=n_classes)[:n_classes].double()
    inter = torch.bincount(pred[pred == target], minlength=n_classes)[:n_classes].double()
    denom = p + t
    return torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.full_like(denom, float("nan")))
