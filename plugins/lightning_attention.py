"""TensorRT plugins ``minimax::lightning_prefill`` and ``minimax::lightning_decode``.

Each plugin is one launch of the Triton kernel of ``kernels/lightning_attention/{chunk,recurrent}.py``, through a
thin entry kernel with TensorRT's AOT argument order (inputs, int32 extra args, outputs) that calls the kernel as a
device function. TensorRT tensors are contiguous, so every stride is derived from the shape: the head count and
head dims are compile-time constants (fixed network dims), the token count T is the one extra arg of the prefill,
and the batch B only enters the grid. The initial state is always given (zeros for a fresh sequence).

``plan_*`` need no TensorRT (tests use them on ints); ``register`` imports it lazily. No ``from __future__ import
annotations`` here: ``tensorrt.plugin`` reads the registered functions' annotations as classes.
"""

from collections.abc import Mapping, Sequence

import torch
import triton
import triton.language as tl

from kernels.lightning_attention.chunk import _lightning_prefill_kernel, default_prefill_config, supports_head_dims
from kernels.lightning_attention.recurrent import _lightning_decode_kernel

from .algebra import Dim, static
from .payload import KernelPlan
from .spec import PLUGINS, check_call

__all__ = ["plan_lightning_prefill", "plan_lightning_decode", "PLANNERS", "TACTICS", "register"]

_CUDA = torch.device("cuda")


@triton.jit
def lightning_prefill_entry(
    q,  # [B, T, H, DK]
    k,  # [B, T, H, DK]
    v,  # [B, T, H, DV]
    s,  # [H] fp32
    initial_state,  # [B, H, DK, DV] fp32
    T,  # int32 extra arg
    o,  # [B, T, H, DV]
    final_state,  # [B, H, DK, DV] fp32
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    seq_k = T.to(tl.int64) * (H * DK)  # batch strides in int64: T * H * D passes 2^31 at T = 256K (H=64, D=128)
    seq_v = T.to(tl.int64) * (H * DV)
    _lightning_prefill_kernel(
        q, k, v, s, initial_state, o, final_state, T, H,
        seq_k, H * DK, DK,  # q strides (b, t, h)
        seq_k, H * DK, DK,  # k
        seq_v, H * DV, DV,  # v
        seq_v, H * DV, DV,  # o
        H * DK * DV, DK * DV, DV,  # state (b, h, k)
        DK=DK, DV=DV, BLOCK_T=BLOCK_T, BLOCK_V=BLOCK_V, HAS_INITIAL_STATE=True,
        DOT_PRECISION=DOT_PRECISION, NUM_STAGES=NUM_STAGES,
    )  # fmt: skip


@triton.jit
def lightning_decode_entry(
    q,  # [B, 1, H, DK]
    k,  # [B, 1, H, DK]
    v,  # [B, 1, H, DV]
    s,  # [H] fp32
    state,  # [B, H, DK, DV] fp32
    o,  # [B, 1, H, DV]
    new_state,  # [B, H, DK, DV] fp32
    H: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    _lightning_decode_kernel(
        q, k, v, s, state, o, new_state, H,
        H * DK, DK,  # q strides (b, h)
        H * DK, DK,  # k
        H * DV, DV,  # v
        H * DK * DV, DK * DV, DV,  # state (b, h, k)
        H * DK * DV, DK * DV, DV,  # new state
        DK=DK, DV=DV, BLOCK_V=BLOCK_V,
    )  # fmt: skip


def _dims(name: str, shapes: Sequence[tuple[Dim, ...]]) -> tuple[Dim, Dim, int, int, int]:
    """(B, T, H, Dk, Dv) with H, Dk, Dv build-time constants; checks the head dims the kernels take."""
    (b, t, h, dk), v_shape = shapes[0], shapes[2]
    h = static(h, f"{name}: q dim 2 (heads)")
    dk = static(dk, f"{name}: q dim 3 (key head dim)")
    dv = static(v_shape[3], f"{name}: v dim 3 (value head dim)")
    if not supports_head_dims(dk, dv):
        raise ValueError(f"{name}: head dims must be powers of two in [16, 256]; got Dk={dk} (q), Dv={dv} (v)")
    return b, t, h, dk, dv


def _io(name: str, dtypes: Sequence[torch.dtype]):
    spec = PLUGINS[name]
    out = spec.output_dtypes(dtypes)
    return tuple(zip(spec.inputs, dtypes)), tuple(zip(spec.outputs, out))


# Tactics: 1-based ids TensorRT may time. Prefill: the tuned default (depends on dtype and head dims only).
# Decode: the two H100-tuned widths of recurrent._decode_block_v (narrow for B*H < 1024, wide otherwise).
_DECODE_TACTICS = {1: (16, 2), 2: (64, 4)}  # tactic -> (BLOCK_V, num_warps)
TACTICS: dict[str, tuple[int, ...]] = {"lightning_prefill": (1,), "lightning_decode": tuple(_DECODE_TACTICS)}


def plan_lightning_prefill(
    dtypes: Sequence[torch.dtype], shapes: Sequence[tuple[Dim, ...]], attrs: Mapping[str, int], tactic: int = 1
) -> KernelPlan:
    """q, k, v, s, initial_state -> o, final_state; grid (Dv / BLOCK_V, B * H); extra args (T,)."""
    name = "lightning_prefill"
    check_call(PLUGINS[name], shapes, attrs)
    b, t, h, dk, dv = _dims(name, shapes)
    inputs, outputs = _io(name, dtypes)
    cfg = default_prefill_config(1, h, dk, dv, dtypes[0], _CUDA)
    block_v = min(cfg.block_v, dv)
    return KernelPlan(
        plugin=name,
        fn=lightning_prefill_entry,
        inputs=inputs,
        extra_args=(("T", t),),
        outputs=outputs,
        constexprs=dict(
            H=h, DK=dk, DV=dv, BLOCK_T=cfg.block_t, BLOCK_V=block_v,
            DOT_PRECISION="tf32x3" if dtypes[0] == torch.float32 else "tf32", NUM_STAGES=cfg.num_stages,
        ),  # fmt: skip
        grid=(dv // block_v, b * h, 1),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        tactic=tactic,
    )


def plan_lightning_decode(
    dtypes: Sequence[torch.dtype], shapes: Sequence[tuple[Dim, ...]], attrs: Mapping[str, int], tactic: int = 1
) -> KernelPlan:
    """q, k, v [B, 1, H, D], s, state -> o, new_state; grid (Dv / BLOCK_V, B * H); no extra args."""
    name = "lightning_decode"
    check_call(PLUGINS[name], shapes, attrs)
    b, t, h, dk, dv = _dims(name, shapes)
    if static(t, f"{name}: q dim 1 (tokens)") != 1:
        raise ValueError(f"{name}: q must be [B, 1, H, Dk] (one token per sequence); got T={t}")
    if tactic not in _DECODE_TACTICS:
        raise ValueError(f"{name}: unknown tactic {tactic}; valid: {sorted(_DECODE_TACTICS)}")
    inputs, outputs = _io(name, dtypes)
    block_v, warps = _DECODE_TACTICS[tactic]
    block_v = min(block_v, dv)
    return KernelPlan(
        plugin=name,
        fn=lightning_decode_entry,
        inputs=inputs,
        extra_args=(),
        outputs=outputs,
        constexprs=dict(H=h, DK=dk, DV=dv, BLOCK_V=block_v),
        grid=(dv // block_v, b * h, 1),
        num_warps=warps,
        num_stages=1,
        tactic=tactic,
    )


PLANNERS = {"lightning_prefill": plan_lightning_prefill, "lightning_decode": plan_lightning_decode}


def register() -> None:
    """Register both plugins with ``tensorrt.plugin`` (register, autotune, aot_impl). Needs TensorRT >= 10.9."""
    from typing import List, Tuple, Union

    import tensorrt.plugin as trtp

    from . import _trt

    @trtp.register("minimax::lightning_prefill")
    def _prefill_desc(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, s: trtp.TensorDesc, initial_state: trtp.TensorDesc
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _trt.output_descs("lightning_prefill", (q, k, v, s, initial_state), {})

    @trtp.autotune("minimax::lightning_prefill")
    def _prefill_tune(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        s: trtp.TensorDesc,
        initial_state: trtp.TensorDesc,
        outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc],
    ) -> List[trtp.AutoTuneCombination]:
        return _trt.combinations("lightning_prefill", TACTICS["lightning_prefill"])

    @trtp.aot_impl("minimax::lightning_prefill")
    def _prefill_aot(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        s: trtp.TensorDesc,
        initial_state: trtp.TensorDesc,
        outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return _trt.aot("lightning_prefill", (q, k, v, s, initial_state), {}, tactic)

    @trtp.register("minimax::lightning_decode")
    def _decode_desc(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, s: trtp.TensorDesc, state: trtp.TensorDesc
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _trt.output_descs("lightning_decode", (q, k, v, s, state), {})

    @trtp.autotune("minimax::lightning_decode")
    def _decode_tune(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        s: trtp.TensorDesc,
        state: trtp.TensorDesc,
        outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc],
    ) -> List[trtp.AutoTuneCombination]:
        return _trt.combinations("lightning_decode", TACTICS["lightning_decode"])

    @trtp.aot_impl("minimax::lightning_decode")
    def _decode_aot(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        s: trtp.TensorDesc,
        state: trtp.TensorDesc,
        outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        return _trt.aot("lightning_decode", (q, k, v, s, state), {}, tactic)
