"""MiniMax MoE: reference (``naive``), Triton kernels (``routing``, ``grouped``, launcher ``dispatch``; imported on
first use so that importing this package never imports triton) and the ``minimax::moe`` custom op (``op``)."""

from __future__ import annotations

from torch import Tensor

from . import naive, op

__all__ = ["moe_forward", "BACKENDS"]

BACKENDS = ("naive", "op", "triton")


def moe_forward(
    x: Tensor, router_weight: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, top_k: int, backend: str = "naive"
) -> Tensor:
    """Routed SwiGLU experts: x [T, hidden]; router_weight [E, hidden]; w1, w3 [E, I, hidden]; w2 [E, hidden, I].

    Returns y [T, hidden] in x.dtype. ``backend="naive"`` runs the fp32 reference directly, ``backend="op"`` goes
    through ``torch.ops.minimax.moe`` (the path the model takes), ``backend="triton"`` calls the Triton launcher
    directly (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"moe: unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    naive.check_moe_inputs(x, router_weight, w1, w3, w2, top_k)
    if backend == "naive":
        return naive.moe_forward(x, router_weight, w1, w3, w2, top_k)
    if backend == "triton":
        from .dispatch import moe_forward_triton

        return moe_forward_triton(x, router_weight, w1, w3, w2, top_k)
    return op.moe(x, router_weight, w1, w3, w2, top_k)
