"""The training losses: HoVer-Net's (nucleus pixels: cross-entropy + soft Dice; distance maps:
MSE + gradient MSE inside nuclei), the partial-label class NLL and the shift-consistency loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "hovernet_loss",
    "partial_label_nll",
    "shift_consistency_loss",
]


def _sobel(hv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal derivative of channel 0 and vertical derivative of channel 1 (5x5 Sobel)."""
    r = torch.arange(-2, 3, dtype=hv.dtype, device=hv.device)
    h = r / (r * r + r[:, None] ** 2 + 1e-15)
    h = h.masked_fill(torch.isnan(h), 0)
    kx, ky = h.view(1, 1, 5, 5), h.t().reshape(1, 1, 5, 5)
    gx = F.conv2d(hv[:, :1], kx, padding=2)
    gy = F.conv2d(hv[:, 1:], ky, padding=2)
    return gx, gy


def partial_label_nll(
    tp_logits: torch.Tensor, allowed_px: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``-log sum_{c in A} p_c`` averaged with ``weight``; A = {background} off nuclei.

    Parameters
    ----------
    tp_logits : Tensor (N, C, H, W)
        Class logits, channel 0 background, channel k = PanNuke class k.
    allowed_px : Tensor (N, H, W) uint8
        Allowed bitmask per pixel (bit k-1 = class k); 0 = background pixel.
    weight : Tensor (N, H, W)
        Per-pixel weight (0 ignores a pixel).
    """
    logp = F.log_softmax(tp_logits.float(), dim=1)
    c = logp.shape[1]
    bits = torch.stack([(allowed_px.long() >> k) & 1 for k in range(c - 1)], dim=1).bool()
    allowed = torch.cat([(allowed_px == 0).unsqueeze(1), bits], dim=1)
    nll = -torch.logsumexp(logp.masked_fill(~allowed, float("-inf")), dim=1)
    return (nll * weight).sum() / weight.sum().clamp(min=1)


def _labelled_px(allowed_px: torch.Tensor) -> torch.Tensor:
    """Nucleus pixels whose class is known to within two classes (e.g. 2, 4 or 17 = Neo|Epi)."""
    a = allowed_px.long()
    bits = sum((a >> k) & 1 for k in range(5))
    return (a > 0) & (bits <= 2)


def shift_consistency_loss(
    out: dict[str, torch.Tensor], shifts: torch.Tensor, classes: bool = True
) -> torch.Tensor:
    """Mean squared difference of the predicted maps (nucleus and class probabilities, tanh
    distance maps) of each shifted pair of views, over the pixels both views see.

    ``classes=False`` leaves the class probabilities out: only the segmentation maps (nucleus
    probability, distance maps) are asked to agree, so the term cannot trade the class head's
    calls for agreement."""
    parts = [torch.softmax(out["np"].float(), 1)[:, 1:2], torch.tanh(out["hv"].float())]
    if classes and "tp" in out:
        parts.append(torch.softmax(out["tp"].float(), 1))
    p = torch.cat(parts, 1)
    a, b = p[0::2], p[1::2]
    n = p.shape[-1]
    terms = [
        ((a[k, :, dy:, dx:] - b[k, :, : n - dy, : n - dx]) ** 2).mean()
        for k, (dy, dx) in enumerate(shifts.tolist())
    ]
    return torch.stack(terms).mean()


def hovernet_loss(
    out: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    class_weight: float = 1.0,
    shift_consistency: float = 0.0,
    msge_weight: float = 1.0,
    shift_classes: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (HoVer-Net weights: 1 each, MSGE 1, HV MSE 2 in the paper's code).

    ``msge_weight`` multiplies the HV gradient term (MSGE), the one that sharpens the fall of the
    distance maps between touching nuclei, where the watershed splits them.

    ``class_weight`` multiplies, in the class loss, the weight of nucleus pixels whose class is
    known to within two classes, so that the few labelled nuclei are not drowned by background
    pixels and by nuclei labelled only "unknown" or "not neoplastic".

    ``shift_classes=False`` applies the shift-consistency term to the segmentation maps only.
    """
    mask = b["mask"]
    np_logits = out["np"].float()
    ce = (F.cross_entropy(np_logits, b["np"], reduction="none") * mask).sum() / mask.sum().clamp(
        min=1
    )
    p = torch.softmax(np_logits, dim=1)[:, 1]
    t = b["np"].float()
    dice = 1 - (2 * (p * t * mask).sum() + 1) / ((p * mask).sum() + (t * mask).sum() + 1)

    hv = torch.tanh(out["hv"].float())
    hv_w = mask * b["hv_on"].view(-1, 1, 1)
    mse = (((hv - b["hv"]) ** 2).sum(1) * hv_w).sum() / (2 * hv_w.sum()).clamp(min=1)
    gx, gy = _sobel(hv)
    tx, ty = _sobel(b["hv"])
    nuc = t * hv_w
    msge = ((((gx - tx) ** 2 + (gy - ty) ** 2).squeeze(1)) * nuc).sum() / (2 * nuc.sum()).clamp(
        min=1
    )

    parts = {"np_ce": ce, "np_dice": dice, "hv_mse": mse, "hv_msge": msge}
    if "tp" in out:
        # class loss where "cls_mask" says (= mask for instance labels; the point disks for
        # point labels), labelled nucleus pixels weighted by class_weight
        cmask = b.get("cls_mask", mask)
        w = (
            cmask * (1 + (class_weight - 1) * _labelled_px(b["allowed"]).float())
            if class_weight != 1
            else cmask
        )
        parts["tp_nll"] = partial_label_nll(out["tp"], b["allowed"], w)
    total = ce + dice + 2 * mse + msge_weight * msge + parts.get("tp_nll", 0.0)
    if shift_consistency and "pair_shift" in b:
        # the network aliases (strided convolutions): the same tissue shifted by a pixel gave
        # other nuclei; this term asks for the same maps whatever the shift
        parts["shift_cons"] = shift_consistency_loss(out, b["pair_shift"], shift_classes)
        total = total + shift_consistency * parts["shift_cons"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
