"""Triton lightning attention (``chunk.py`` prefill, ``recurrent.py`` decode) against the fp32 reference ``naive.py``.

Without CUDA the kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` is set here, before anything imports
the kernel modules (``@triton.jit`` reads it when a kernel is defined; this package imports them on first use).
CPU shapes are tiny (the interpreter is numpy). Tests marked ``gpu`` use the real sizes (H=64, D=128).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kernels.lightning_attention import (  # noqa: E402
    lightning_attention_decode,
    lightning_attention_prefill,
    naive,
)
from kernels.lightning_attention.chunk import PrefillConfig, lightning_prefill_triton  # noqa: E402
from kernels.lightning_attention.recurrent import lightning_decode_triton, lightning_decode_triton_  # noqa: E402
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5 if DEVICE == "cpu" else 1e-4  # GPU fp32 products use tf32x3


def _inputs(B, T, H, DK, DV=None, seed=0, with_state=True, device=DEVICE, dtype=torch.float32, s=None):
    g = torch.Generator().manual_seed(seed)
    DV = DV or DK
    q = torch.randn(B, T, H, DK, generator=g)
    k = torch.randn(B, T, H, DK, generator=g)
    v = torch.randn(B, T, H, DV, generator=g)
    if s is None:
        s = torch.rand(H, generator=g) * 0.9 + 0.01  # fast and slow heads
    state = torch.randn(B, H, DK, DV, generator=g) if with_state else None
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return to(q).to(dtype), to(k).to(dtype), to(v).to(dtype), to(s.float()), to(state)


def _nan_like(shape, dtype, device=DEVICE):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _prefill_poisoned(q, k, v, s, state, **kwargs):
    """Run the prefill into NaN-filled outputs, so an element the kernel does not write fails the comparison."""
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    out = _nan_like((B, T, H, DV), q.dtype, q.device)
    final = _nan_like((B, H, DK, DV), torch.float32, q.device)
    o, S = lightning_prefill_triton(q, k, v, s, state, out=out, final_state_out=final, **kwargs)
    assert o.data_ptr() == out.data_ptr() and S.data_ptr() == final.data_ptr()
    return o, S


# ------------------------------------------------------------------------------------------------ prefill, fp32


@pytest.mark.parametrize("T", [1, 7, 16, 33])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("with_state", [False, True])
def test_prefill_matches_reference(T, B, with_state):
    q, k, v, s, S0 = _inputs(B, T, 3, 16, seed=T + 10 * B, with_state=with_state)
    o, S = _prefill_poisoned(q, k, v, s, S0)
    ref_o, ref_S = naive.lightning_attention_recurrent(q, k, v, s, S0)
    assert o.shape == ref_o.shape and o.dtype == ref_o.dtype and o.is_contiguous()
    assert rel_err(o, ref_o) < FP32_TOL
    assert rel_err(S, ref_S) < FP32_TOL


@pytest.mark.parametrize(
    "config",
    [PrefillConfig(block_t=16, block_v=16, num_warps=1), PrefillConfig(block_t=32, block_v=32, num_warps=2)],
    ids=["bt16-bv16", "bt32-bv32"],
)
@pytest.mark.parametrize("DK, DV", [(32, 32), (16, 32)])
def test_prefill_block_configs_and_head_dims(config, DK, DV):
    """T = 40 spans one full and one partial block (or two full + one partial); value slices and Dk != Dv."""
    q, k, v, s, S0 = _inputs(2, 40, 3, DK, DV, seed=5)
    o, S = _prefill_poisoned(q, k, v, s, S0, config=config)
    ref_o, ref_S = naive.lightning_attention_quadratic(q, k, v, s, S0)
    assert rel_err(o, ref_o) < FP32_TOL
    assert rel_err(S, ref_S) < FP32_TOL


def test_prefill_state_carried_across_calls_equals_one_call():
    q, k, v, s, S0 = _inputs(2, 37, 3, 16, seed=3)
    o_all, S_all = lightning_prefill_triton(q, k, v, s, S0)
    o1, S1 = lightning_prefill_triton(q[:, :19], k[:, :19], v[:, :19], s, S0)
    o2, S2 = lightning_prefill_triton(q[:, 19:], k[:, 19:], v[:, 19:], s, S1)
    assert rel_err(torch.cat([o1, o2], 1), o_all) < FP32_TOL
    assert rel_err(S2, S_all) < FP32_TOL
    ref_o, ref_S = naive.lightning_attention_recurrent(q, k, v, s, S0)
    assert rel_err(S2, ref_S) < FP32_TOL


def test_prefill_strided_qkv_views():
    """q, k, v as per-head slices of one [B, T, H, 3D] projection (MiniMax's interleaved qkv layout): no copies."""
    B, T, H, D = 2, 21, 3, 16
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, T, H, 3 * D, generator=g).to(DEVICE)
    q, k, v = qkv.split(D, dim=-1)
    assert not q.is_contiguous()
    s = (torch.rand(H, generator=g) * 0.5).to(DEVICE)
    S0 = torch.randn(B, H, D, D, generator=g).to(DEVICE)
    o, S = _prefill_poisoned(q, k, v, s, S0)
    ref_o, ref_S = naive.lightning_attention_recurrent(q, k, v, s, S0)
    assert rel_err(o, ref_o) < FP32_TOL
    assert rel_err(S, ref_S) < FP32_TOL


def test_prefill_final_state_in_place():
    """final_state_out may be the initial state itself (each program reads its slice before writing it)."""
    q, k, v, s, S0 = _inputs(1, 20, 3, 16, seed=11)
    ref_o, ref_S = naive.lightning_attention_recurrent(q, k, v, s, S0)
    state = S0.clone()
    o, S = lightning_prefill_triton(q, k, v, s, state, final_state_out=state)
    assert S.data_ptr() == state.data_ptr()
    assert rel_err(o, ref_o) < FP32_TOL
    assert rel_err(state, ref_S) < FP32_TOL


@pytest.mark.parametrize("rate", [0.0, 6.0])
def test_prefill_extreme_decays_are_finite(rate):
    """s = 0 (no decay) and a very fast decay (exp(-6 x 15) ~ 1e-39 inside a block) stay finite and correct."""
    H = 3
    q, k, v, _, S0 = _inputs(1, 33, H, 16, seed=13)
    s = torch.full((H,), rate, device=DEVICE)
    o, S = _prefill_poisoned(q, k, v, s, S0)
    ref_o, ref_S = naive.lightning_attention_recurrent(q, k, v, s, S0)
    assert rel_err(o, ref_o) < FP32_TOL
    assert rel_err(S, ref_S) < FP32_TOL


def test_prefill_public_api_triton_backend():
    q, k, v, s, _ = _inputs(2, 9, 3, 16, seed=17, with_state=False)
    o, S = lightning_attention_prefill(q, k, v, s, backend="triton")
    ref_o, ref_S = lightning_attention_prefill(q, k, v, s, backend="naive")
    assert rel_err(o, ref_o) < FP32_TOL
    assert rel_err(S, ref_S) < FP32_TOL


# ------------------------------------------------------------------------------------------------ decode, fp32


@pytest.mark.parametrize("B", [1, 2])
def test_decode_matches_reference(B):
    q, k, v, s, S0 = _inputs(B, 1, 3, 16, seed=20 + B)
    out = _nan_like((B, 1, 3, 16), torch.float32)
    new = _nan_like((B, 3, 16, 16), torch.float32)
    S0_before = S0.clone()
    o, S = lightning_decode_triton(q, k, v, s, S0, out=out, new_state_out=new)
    ref_o, ref_S = naive.lightning_attention_decode_step(q, k, v, s, S0)
    assert o.data_ptr() == out.data_ptr() and S.data_ptr() == new.data_ptr()
    assert torch.equal(S0, S0_before)  # functional: the input state is not modified
    assert rel_err(o, ref_o) < FP32_TOL
    assert rel_err(S, ref_S) < FP32_TOL


def test_decode_in_place_and_dk_ne_dv():
    q, k, v, s, S0 = _inputs(2, 1, 3, 16, 32, seed=30)
    ref_o, ref_S = naive.lightning_attention_decode_step(q, k, v, s, S0)
    state = S0.clone()
    o = lightning_decode_triton_(q, k, v, s, state)
    assert rel_err(o, ref_o) < FP32_TOL
    assert rel_err(state, ref_S) < FP32_TOL


def test_traced_in_place_decode_matches_reference():
    """The traced body of ``minimax::lightning_decode_`` (what compiled programs launch), run eagerly on strided
    q / k / v views: the state is overwritten with the reference's new state, the output equals the reference's."""
    from kernels.lightning_attention.traced import lightning_decode_inplace_traceable

    B, H, D = 3, 2, 16
    g = torch.Generator().manual_seed(41)
    qkv = torch.randn(B, 1, H, 3 * D, generator=g).to(DEVICE)
    q, k, v = qkv.split(D, dim=-1)
    s = (torch.rand(H, generator=g) * 0.9).to(DEVICE)
    S0 = torch.randn(B, H, D, D, generator=g).to(DEVICE)
    ref_o, ref_S = naive.lightning_attention_decode_step(q, k, v, s, S0)
    state = S0.clone()
    o = lightning_decode_inplace_traceable(q, k, v, s, state)
    assert rel_err(o, ref_o) < FP32_TOL and rel_err(state, ref_S) < FP32_TOL


def test_decode_strided_qkv_and_public_api():
    B, H, D = 2, 3, 16
    g = torch.Generator().manual_seed(40)
    qkv = torch.randn(B, 1, H, 3 * D, generator=g).to(DEVICE)
    q, k, v = qkv.split(D, dim=-1)
    s = (torch.rand(H, generator=g) * 0.9).to(DEVICE)
    S0 = torch.randn(B, H, D, D, generator=g).to(DEVICE)
    o, S = lightning_attention_decode(q, k, v, s, S0, backend="triton")
    ref_o, ref_S = naive.lightning_attention_decode_step(q, k, v, s, S0)
    assert rel_err(o, ref_o) < FP32_TOL
    assert rel_err(S, ref_S) < FP32_TOL


def test_prefill_then_decode_steps_equal_one_prefill():
    """Prefill 13 tokens then decode 3 one by one == prefill of all 16 tokens (outputs and final state)."""
    q, k, v, s, S0 = _inputs(2, 16, 3, 16, seed=50)
    o_all, S_all = lightning_prefill_triton(q, k, v, s, S0)
    o_pre, S = lightning_prefill_triton(q[:, :13], k[:, :13], v[:, :13], s, S0)
    outs = [o_pre]
    for t in range(13, 16):
        o_t, S = lightning_decode_triton(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], s, S)
        outs.append(o_t)
    assert rel_err(torch.cat(outs, 1), o_all) < FP32_TOL
    assert rel_err(S, S_all) < FP32_TOL


def test_rejects_bad_shapes():
    q, k, v, s, S0 = _inputs(1, 4, 3, 16, seed=60)
    with pytest.raises(ValueError):
        lightning_prefill_triton(q, k, v, s[:2], S0)
    with pytest.raises(ValueError):
        lightning_prefill_triton(q[..., :12], k[..., :12], v, s, None)  # head dim not a power of two
    with pytest.raises(ValueError):
        lightning_decode_triton(q, k, v, s, S0)  # T = 4 is not a decode step


# ------------------------------------------------------------------------------------------------ GPU, real sizes

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _minimax_rates(H: int, layer: int = 0, num_layers: int = 80) -> torch.Tensor:
    """s_{l,h} = 2^(-(h+1) 8/H) (1 - l/(L-1) + 1e-5): MiniMax's per-layer, per-head decay rates."""
    h = torch.arange(H, dtype=torch.float32)
    return 2.0 ** (-(h + 1) * 8.0 / H) * (1 - layer / (num_layers - 1) + 1e-5)


def _real_inputs(B, T, H=64, D=128, seed=0, dtype=torch.bfloat16, layer=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # SiLU features as in the model (all three of q, k, v pass SiLU), so scores are positive-biased and coherent
    q, k, v = (torch.nn.functional.silu(torch.randn(B, T, H, D, generator=g, device="cuda")).to(dtype) for _ in "qkv")
    S0 = torch.randn(B, H, D, D, generator=g, device="cuda")
    return q, k, v, _minimax_rates(H, layer).cuda(), S0


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T", [1, 63, 1000, 4099])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("layer", [0, 78])
def test_gpu_prefill_bf16_real_sizes(T, B, layer):
    q, k, v, s, S0 = _real_inputs(B, T, seed=T + B, layer=layer)
    o, S = _prefill_poisoned(q, k, v, s, S0)
    ref_o, ref_S = naive.lightning_attention_blockwise(q.float(), k.float(), v.float(), s, S0)
    assert o.dtype == torch.bfloat16 and o.is_contiguous()
    assert rel_err(o, ref_o) < 1e-2
    assert rel_err(S, ref_S) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_prefill_fp32_and_head_dims(D):
    q, k, v, s, S0 = _real_inputs(2, 777, H=5, D=D, seed=D, dtype=torch.float32)
    o, S = _prefill_poisoned(q, k, v, s, S0)
    ref_o, ref_S = naive.lightning_attention_blockwise(q, k, v, s, S0)
    assert rel_err(o, ref_o) < 1e-4
    assert rel_err(S, ref_S) < 1e-4


@pytest.mark.gpu
@gpu
def test_gpu_prefill_fp16_and_carry():
    q, k, v, s, S0 = _real_inputs(1, 2050, seed=3, dtype=torch.float16, layer=40)
    o1, S1 = lightning_prefill_triton(q[:, :1025], k[:, :1025], v[:, :1025], s, S0)
    o2, S2 = lightning_prefill_triton(q[:, 1025:], k[:, 1025:], v[:, 1025:], s, S1)
    ref_o, ref_S = naive.lightning_attention_blockwise(q.float(), k.float(), v.float(), s, S0)
    assert rel_err(torch.cat([o1, o2], 1), ref_o) < 1e-2
    assert rel_err(S2, ref_S) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B", [1, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_decode_real_sizes(B, dtype):
    q, k, v, s, S0 = _real_inputs(B, 1, seed=B, dtype=dtype)
    out = _nan_like((B, 1, 64, 128), dtype)
    new = _nan_like((B, 64, 128, 128), torch.float32)
    o, S = lightning_decode_triton(q, k, v, s, S0, out=out, new_state_out=new)
    ref_o, ref_S = naive.lightning_attention_decode_step(q.float(), k.float(), v.float(), s, S0)
    assert rel_err(o, ref_o) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert rel_err(S, ref_S) < 1e-5
    state = S0.clone()
    o_inplace = lightning_decode_triton_(q, k, v, s, state)
    assert torch.equal(o_inplace, o) and torch.equal(state, S)


@pytest.mark.gpu
@gpu
def test_gpu_custom_ops_use_triton_and_match_fake():
    import torch.library
    from torch._subclasses.fake_tensor import FakeTensorMode

    def fake_call(fn, *args):  # the op's fake kernel (the triton_op body under fake tensors): its output metadata
        with FakeTensorMode() as mode:
            return fn(*(mode.from_tensor(a) for a in args))

    q, k, v, s, S0 = _real_inputs(2, 70, H=3, D=64, seed=9)
    o, S = torch.ops.minimax.lightning_prefill(q, k, v, s, S0)
    ref_o, ref_S = naive.lightning_attention_blockwise(q.float(), k.float(), v.float(), s, S0)
    assert rel_err(o, ref_o) < 1e-2 and rel_err(S, ref_S) < 1e-2
    fake_o, fake_S = fake_call(torch.ops.minimax.lightning_prefill, q, k, v, s, S0)
    assert (o.shape, o.dtype, o.stride()) == (fake_o.shape, fake_o.dtype, fake_o.stride())
    assert (S.shape, S.dtype, S.stride()) == (fake_S.shape, fake_S.dtype, fake_S.stride())
    torch.library.opcheck(torch.ops.minimax.lightning_prefill.default, (q, k, v, s, S0))

    qd, kd, vd = q[:, :1], k[:, :1], v[:, :1]
    o, S = torch.ops.minimax.lightning_decode(qd, kd, vd, s, S0)
    fake_o, fake_S = fake_call(torch.ops.minimax.lightning_decode, qd, kd, vd, s, S0)
    assert (o.shape, o.dtype, o.stride()) == (fake_o.shape, fake_o.dtype, fake_o.stride())
    assert (S.shape, S.dtype, S.stride()) == (fake_S.shape, fake_S.dtype, fake_S.stride())
    ref_o, ref_S = naive.lightning_attention_decode_step(qd.float(), kd.float(), vd.float(), s, S0)
    assert rel_err(o, ref_o) < 1e-2 and rel_err(S, ref_S) < 1e-5
    torch.library.opcheck(torch.ops.minimax.lightning_decode.default, (qd, kd, vd, s, S0))
