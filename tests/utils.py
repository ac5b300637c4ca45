"""Comparison helpers for tests."""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf so that it always fails a tolerance."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def logit_report(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max |dlogit|, relative error, mean KL(ref || ours) and top-1 agreement over all positions."""
    ours, ref = ours.double(), ref.double()
    logp_ref = torch.log_softmax(ref, -1)
    logp_ours = torch.log_softmax(ours, -1)
    kl = (logp_ref.exp() * (logp_ref - logp_ours)).sum(-1)
    return {
        "max_abs": (ours - ref).abs().max().item(),
        "rel": rel_err(ours, ref),
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "top1": (ours.argmax(-1) == ref.argmax(-1)).double().mean().item(),
    }
