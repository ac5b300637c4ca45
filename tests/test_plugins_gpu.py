"""The AOT payload of every TensorRT plugin on the GPU, without TensorRT.

Each payload is built exactly as ``aot_impl`` builds it (``plugins.build_payload``: same plan, signature,
constexprs, grid/extra-arg expressions evaluated on the tensors' shapes), its PTX is loaded with the CUDA driver
API and launched with TensorRT's argument order plus Triton's two null scratch pointers (``plugins.driver``), on
NaN-poisoned outputs, and compared with the references: lightning prefill/decode at H=64, D=128 and MoE stages
at E=32 (hidden 1024, I 704 for the stage tests; one real-size chain at hidden 6144, I 9216), bf16, T = 1, 37,
1029. The checks are the ones ``test_plugins.py`` runs through the interpreter on the CPU.
"""

import pytest
import torch

from tests.test_plugins import (
    check_align,
    check_chain,
    check_decode_stages,
    check_decode_stages_int8,
    check_grouped_stages,
    check_grouped_stages_int8,
    check_lightning_decode,
    check_lightning_prefill,
    check_paged_decode,
    check_paged_kv_write,
    check_paged_prefill,
    check_route,
    moe_inputs,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine: pytest -m gpu)"),
]
pytest.importorskip("cuda.bindings.driver", reason="cuda-bindings (cuda.bindings.driver) is not installed")

CUDA = "cuda"
bf16, f32 = torch.bfloat16, torch.float32
H, D = 64, 128  # MiniMax-Text-01 lightning heads and head dim
E, HIDDEN, INTER, TOP_K = 32, 1024, 704, 2  # E and top_k of MiniMax; I not a multiple of the N tiles


@pytest.mark.parametrize("B,T", [(1, 1), (1, 37), (2, 1029)])
def test_gpu_lightning_prefill_bf16(B, T):
    check_lightning_prefill(B, T, H, D, bf16, CUDA, tol=1e-2)


def test_gpu_lightning_prefill_fp32():
    check_lightning_prefill(1, 37, H, D, f32, CUDA, tol=1e-4)


@pytest.mark.parametrize("B", [1, 17])
@pytest.mark.parametrize("tactic", [1, 2])
def test_gpu_lightning_decode_bf16(B, tactic):
    check_lightning_decode(B, H, D, bf16, CUDA, tactic, tol=1e-2)


@pytest.mark.parametrize("T,tactic", [(1, 1), (37, 1), (37, 2), (37, 3), (37, 4), (1029, 2), (1029, 4)])
def test_gpu_route_bf16(T, tactic):
    check_route(T, E, HIDDEN, TOP_K, bf16, CUDA, tactic)


@pytest.mark.parametrize("T,block_m", [(1, 16), (37, 64), (1029, 128)])
def test_gpu_align(T, block_m):
    check_align(T, TOP_K, E, block_m, CUDA)


@pytest.mark.parametrize("T", [37, 1029])
@pytest.mark.parametrize("tactic", [1, 2, 3, 4])
def test_gpu_grouped_stages_bf16(T, tactic):
    check_grouped_stages(T, E, HIDDEN, INTER, TOP_K, 64, bf16, CUDA, tactic, tol=1e-2)


@pytest.mark.parametrize("T", [1, 5, 16])
def test_gpu_decode_stages_bf16(T):
    check_decode_stages(T, E, HIDDEN, INTER, TOP_K, bf16, CUDA, tol=1e-2)


@pytest.mark.parametrize("T", [37, 1029])
@pytest.mark.parametrize("tactic", [1, 4])
def test_gpu_grouped_stages_int8(T, tactic):
    check_grouped_stages_int8(T, E, HIDDEN, INTER, TOP_K, 64, bf16, CUDA, tactic, tol=1e-2)


@pytest.mark.parametrize("T", [1, 16])
def test_gpu_decode_stages_int8(T):
    check_decode_stages_int8(T, E, HIDDEN, INTER, TOP_K, bf16, CUDA, tol=1e-2)


@pytest.mark.parametrize("T,decode", [(37, False), (1029, False), (1, True), (16, True)])
def test_gpu_chain_bf16(T, decode):
    """route -> align -> swiglu_grouped -> down_grouped -> combine (or the decode chain) == naive.moe_forward."""
    from kernels.moe.dispatch import default_config

    block_m = default_config(T, TOP_K, E, torch.device(CUDA)).block_m
    check_chain(T, E, HIDDEN, INTER, TOP_K, block_m, bf16, CUDA, decode, tol=1e-2)


def test_gpu_chain_real_size_bf16():
    """MiniMax-Text-01 MoE sizes (hidden 6144, E 32 x I 9216, top-2, bf16): grouped chain at T=37, decode at T=1."""
    hidden, inter = 6144, 9216
    _, router, w1, w3, w2 = moe_inputs(1, E, hidden, inter, bf16, CUDA, seed=3)
    for T, decode in ((37, False), (1, True)):
        from kernels.moe.dispatch import default_config

        block_m = default_config(T, TOP_K, E, torch.device(CUDA)).block_m
        check_chain(T, E, hidden, inter, TOP_K, block_m, bf16, CUDA, decode, tol=1e-2, weights=(None, router, w1, w3, w2))


# --- paged softmax attention at MiniMax-Text-01 sizes (64 query / 8 kv heads, D 128), pages of 256 ---------------
@pytest.mark.parametrize("start", [[0, 5], [-3, 1000]])
def test_gpu_paged_kv_write_bf16(start):
    check_paged_kv_write(2, 37, 8, D, 256, 8, bf16, CUDA, start)


@pytest.mark.parametrize("B,T,start", [(1, 37, [0]), (2, 1029, [-5, 700])])
def test_gpu_paged_attention_prefill_bf16(B, T, start):
    check_paged_prefill(B, T, H, 8, D, 256, 8, bf16, CUDA, start, tol=1e-2)


@pytest.mark.parametrize("held", [[1, 2048], [70000, 0]])
def test_gpu_paged_decode_bf16(held):
    """Capacity 80K positions in pages of 256 (split 4096: up to 18 splits), rows at 1, 2048, 70000 and a pad."""
    check_paged_decode(2, H, 8, D, 256, 320, bf16, CUDA, held, tol=1e-2)
