"""``benchmarks/fusion.py`` (kernel grouping, per-call summary, CLI path on the CPU) and the fused-SiLU prefill
``kernels/lightning_attention/fused.py`` against the unfused fp32 reference (``TRITON_INTERPRET=1`` without CUDA)."""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import fusion  # noqa: E402
from kernels.lightning_attention import naive  # noqa: E402
from kernels.lightning_attention.fused import (  # noqa: E402
    lightning_prefill_silu_reference,
    lightning_prefill_silu_triton,
)
from tests.utils import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5 if DEVICE == "cpu" else 1e-4


# ------------------------------------------------------------------------------------------------ grouping logic
@pytest.mark.parametrize(
    "name, group",
    [
        ("_lightning_prefill_kernel", "lightning"),
        ("_lightning_decode_kernel", "lightning"),
        ("_lightning_prefill_silu_kernel", "lightning"),  # SiLU inside our kernel counts as our kernel
        ("minimax::lightning_prefill", "lightning"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off", "gemm"),
        ("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNN", "gemm"),
        ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "gemm"),
        ("triton_tem_fused_mm_silu_0", "gemm"),  # a GEMM template with SiLU as its epilogue: the SiLU is free
        ("triton_tem_fused_mm_1", "gemm"),
        ("triton_poi_fused_silu_where_0", "silu"),
        ("triton_poi_fused_silu_2", "silu"),
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_sigmoid_1", "norm_gate"),
        ("triton_poi_fused_mul_sigmoid_3", "norm_gate"),
        ("aten::silu", "silu"),
        ("aten::linear", "gemm"),
        ("Memset (Device)", "other"),
        ("triton_poi_fused_zeros_4", "other"),
    ],
)
def test_classify_kernel(name, group):
    assert fusion.classify_kernel(name) == group


def test_summarize_per_call_totals_and_shares():
    iters = 3
    calls = [("gemm_a", 10.0), ("triton_poi_fused_silu_0", 2.0), ("_lightning_prefill_kernel", 5.0),
             ("triton_per_fused_mean_rsqrt_sigmoid_1", 1.5), ("gemm_b", 4.0), ("Memset (Device)", 0.5)]
    kernels = [(n, us * (1 + i)) for i in range(iters) for n, us in calls]  # different times per call
    out = fusion.summarize(kernels, iters)
    scale = sum(1 + i for i in range(iters)) / iters
    total = sum(us for _, us in calls) * scale
    assert out["layer_gpu_us"] == pytest.approx(total, rel=1e-12)
    expect = {"gemm": 14.0, "silu": 2.0, "lightning": 5.0, "norm_gate": 1.5, "other": 0.5}
    for grp, us in expect.items():
        assert out["groups"][grp]["us"] == pytest.approx(us * scale, rel=1e-12), grp
        assert out["groups"][grp]["share"] == pytest.approx(us * scale / total, rel=1e-12), grp
    assert sum(g["share"] for g in out["groups"].values()) == pytest.approx(1.0, rel=1e-12)
    assert all(r["calls"] == 1.0 for r in out["kernels"])
    assert [r["us"] for r in out["kernels"]] == sorted((r["us"] for r in out["kernels"]), reverse=True)
    with pytest.raises(ValueError, match="iters"):
        fusion.summarize(kernels, 0)


def test_timeline_labels_gemms():
    # two calls; each: gate GEMM, qkv GEMM (longest), silu, ours, out_proj GEMM
    one = [("gemm_gate", 2.0), ("gemm_qkv", 7.0), ("triton_poi_fused_silu_0", 0.5), ("_lightning_prefill_kernel", 0.4),
           ("gemm_out", 2.1)]
    kernels = [(n, 100.0 * c + i, us) for c in range(2) for i, (n, us) in enumerate(one)]
    timeline = fusion.last_call_timeline(kernels, 2)
    assert [k["name"] for k in timeline] == [n for n, _ in one]
    labels = {k["name"]: k.get("gemm") for k in timeline}
    assert labels == {"gemm_gate": "output_gate", "gemm_qkv": "qkv_proj", "triton_poi_fused_silu_0": None,
                      "_lightning_prefill_kernel": None, "gemm_out": "out_proj"}


def test_pointwise_bytes():
    B, T, H, D = 2, 5, 3, 16
    nb = fusion.pointwise_bytes(B, T, H, D, 2)
    assert nb["silu"] == 2 * (B * T * 3 * H * D) * 2  # read the projection, write q, k, v
    assert nb["norm_gate"] == 3 * (B * T * H * D) * 2  # read o and the gate projection, write the gated o


# ------------------------------------------------------------------------------------------------ fused kernel
def _pre_activation(B, T, H, D, seed):
    """Pre-activation q, k, v as strided views of one interleaved [B, T, H, 3D] projection (as the layer has them)."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, H, 3 * D, generator=g) * 2).to(DEVICE)
    q, k, v = qkv.split(D, dim=-1)
    s = (torch.rand(H, generator=g) * 0.9 + 0.01).to(DEVICE)
    state = torch.randn(B, H, D, D, generator=g).to(DEVICE)
    return q, k, v, s, state


@pytest.mark.parametrize("T", [1, 7, 16, 33, 40])
@pytest.mark.parametrize("with_state", [False, True])
def test_fused_silu_prefill_matches_reference(T, with_state):
    B, H, D = 2, 3, 16
    q, k, v, s, state = _pre_activation(B, T, H, D, seed=T)
    state = state if with_state else None
    out = torch.full((B, T, H, D), float("nan"), device=DEVICE)
    o, S = lightning_prefill_silu_triton(q, k, v, s, state, out=out)
    assert o.data_ptr() == out.data_ptr()
    # the spec: silu applied first, then the plain reference (not our fused.py reference, which could share a bug)
    S0 = state if with_state else torch.zeros(B, H, D, D, device=DEVICE)
    ref_o, ref_S = naive.lightning_attention_recurrent(F.silu(q), F.silu(k), F.silu(v), s, S0)
    assert rel_err(o, ref_o) < FP32_TOL
    assert rel_err(S, ref_S) < FP32_TOL


@pytest.mark.parametrize("T", [7, 33])
def test_fused_silu_prefill_left_pads(T):
    """Rows with negative positions (left pads) contribute nothing: k, v zeroed there, as LightningAttention does."""
    B, H, D = 2, 3, 16
    q, k, v, s, _ = _pre_activation(B, T, H, D, seed=100 + T)
    s = s * 0.05  # slow decays: the pads would still weigh in the final state if they were not masked
    pads = torch.tensor([0, min(5, T - 1)])
    positions = (torch.arange(T)[None, :] - pads[:, None]).to(DEVICE)  # row 1 starts with pads
    o, S = lightning_prefill_silu_triton(q, k, v, s, None, positions)
    ref_o, ref_S = lightning_prefill_silu_reference(q, k, v, s, None, positions)
    real = (positions >= 0)[:, :, None, None]
    assert rel_err(o * real, ref_o * real) < FP32_TOL  # pad outputs are not used
    assert rel_err(S, ref_S) < FP32_TOL
    # and the pads really matter: without the mask the state differs
    _, S_unmasked = lightning_prefill_silu_triton(q, k, v, s, None, None)
    assert rel_err(S_unmasked[1], ref_S[1]) > 1e-2


def test_fused_silu_prefill_bad_input():
    q, k, v, s, state = _pre_activation(1, 4, 2, 16, seed=0)
    with pytest.raises(ValueError, match="token_positions"):
        lightning_prefill_silu_triton(q, k, v, s, state, torch.zeros(1, 5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="initial_state"):
        lightning_prefill_silu_triton(q, k, v, s, state[:, :1])


def test_fused_layer_step_equals_layer():
    """The benchmark's fused variant computes the same layer output and state as LightningAttention (tiny, fp32)."""
    layer, config = fusion.build_layer(tiny=True, device="cpu", dtype=torch.float32)
    B, T = 2, 11
    x = torch.randn(B, T, config.hidden_size, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(T)[None, :] - torch.tensor([0, 4])[:, None]
    state = torch.zeros(B, config.num_attention_heads, config.head_dim, config.head_dim)
    y_ref, S_ref = fusion.LayerStep(layer, decode=False)(x, positions, state)
    y, S = fusion.LayerStep(layer, decode=False, fused=True)(x, positions, state)
    real = (positions >= 0)[:, :, None]
    assert rel_err(y * real, y_ref * real) < 1e-6
    assert rel_err(S, S_ref) < 1e-6


def test_cli_cpu_tiny(tmp_path):
    out = tmp_path / "fusion.json"
    assert fusion.main(["--tiny", "--device", "cpu", "--modes", "eager", "--iters", "2", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    cases = payload["cases"]
    assert [(c["kind"], c["B"], c["T"], c["variant"]) for c in cases] == [
        ("prefill", 1, 40, "baseline"), ("decode", 1, 1, "baseline"), ("decode", 64, 1, "baseline"),
        ("prefill", 1, 40, "fused_silu")]
    by = {(c["kind"], c["B"], c["T"], c["variant"]): c for c in cases}
    base, fused = by[("prefill", 1, 40, "baseline")], by[("prefill", 1, 40, "fused_silu")]
    assert "error" not in base and "error" not in fused
    assert base["groups"]["silu"]["kernels"] == ["aten::silu"] and base["groups"]["silu"]["us"] > 0
    assert fused["groups"]["silu"]["us"] == 0 and fused["groups"]["lightning"]["kernels"] == ["minimax::lightning_prefill_silu"]
    assert base["output_finite"] and fused["output_finite"]
    assert {c["B"] for c in cases if c["kind"] == "decode"} == {1, 64}
