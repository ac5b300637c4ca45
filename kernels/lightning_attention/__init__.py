"""Lightning attention: reference (``naive``), Triton kernels (``chunk``: prefill, ``recurrent``: decode; imported on
first use so that importing this package never imports triton) and the ``minimax::lightning_*`` custom ops (``op``)."""

from __future__ import annotations

from torch import Tensor

from . import naive, op

__all__ = ["lightning_attention_prefill", "lightning_attention_decode", "BACKENDS"]

BACKENDS = ("naive", "op", "triton")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"lightning attention: unknown backend {backend!r}; available: {', '.join(BACKENDS)}")


def lightning_attention_prefill(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, initial_state: Tensor | None = None, backend: str = "naive"
) -> tuple[Tensor, Tensor]:
    """Causal lightning attention over a chunk: q, k, v [B, T, H, D]; s [H] fp32; initial_state [B, H, D, D] fp32.

    Returns ``(o [B, T, H, D], final_state [B, H, D, D] fp32)``. ``backend="naive"`` runs the reference directly,
    ``backend="op"`` goes through ``torch.ops.minimax.lightning_prefill`` (the path the model takes),
    ``backend="triton"`` calls the Triton launcher directly (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).
    """
    _check_backend(backend)
    naive.check_lightning_inputs(q, k, v, s, initial_state)
    if q.shape[1] == 0:
        raise ValueError("lightning attention prefill: the sequence is empty (T = 0)")
    if initial_state is None:
        initial_state = naive._zero_state(q, v)
    if backend == "naive":
        return naive.lightning_attention_blockwise(q, k, v, s, initial_state)
    if backend == "triton":
        from .chunk import lightning_prefill_triton

        return lightning_prefill_triton(q, k, v, s, initial_state)
    return op.lightning_prefill(q, k, v, s, initial_state)


def lightning_attention_decode(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, state: Tensor, backend: str = "naive"
) -> tuple[Tensor, Tensor]:
    """One decode step: q, k, v [B, 1, H, D]; state [B, H, D, D] fp32 -> ``(o [B, 1, H, D], new_state)``."""
    _check_backend(backend)
    if backend == "naive":
        return naive.lightning_attention_decode_step(q, k, v, s, state)
    naive.check_lightning_inputs(q, k, v, s, state)
    if backend == "triton":
        from .recurrent import lightning_decode_triton

        return lightning_decode_triton(q, k, v, s, state)
    return op.lightning_decode(q, k, v, s, state)
