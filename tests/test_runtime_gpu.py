"""GPU suite for the runtime: a CUDA AOTInductor engine (fp32, Triton kernels) generates exactly what the eager
model on the GPU generates, for batch 1, a ragged batch and a chunked prompt; seeded sampling is reproducible.

Run on a CUDA machine: ``LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6 python -m pytest -m gpu
tests/test_runtime_gpu.py`` (the preload is needed on the project's H100 image, tensorrt_notes.md §11).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from export import BuildSettings, EngineFolderError, build_engine
from model import MiniMaxConfig, MiniMaxForCausalLM
from runtime import Engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# The tiny preset with head_dim 64 (a size the Triton lightning kernels take).
CONFIG = dataclasses.replace(MiniMaxConfig.preset("tiny"), head_dim=64, rotary_dim=32)
SETTINGS = BuildSettings(backend="aoti", device="cuda", dtype="float32", max_batch=4, max_input_len=32,
                         max_seq_len=128, page_size=16)


@pytest.fixture(scope="module")
def gpu_model():
    cpu = MiniMaxForCausalLM(CONFIG).init_random_weights(seed=4, std=0.05).eval()
    gpu = MiniMaxForCausalLM(CONFIG).to("cuda").eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.model.reset_buffers()
    return gpu


@pytest.fixture(scope="module")
def engine_dir(gpu_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime_gpu") / "engine"
    build_engine(gpu_model, SETTINGS, out)
    return out


@pytest.fixture(scope="module")
def engines(gpu_model, engine_dir):
    aoti = Engine.load(engine_dir)
    eager = Engine.from_model(gpu_model, SETTINGS.max_batch, SETTINGS.max_input_len, SETTINGS.max_seq_len,
                              page_size=SETTINGS.page_size)
    return aoti, eager


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, CONFIG.vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("lengths", [[29], [30, 7, 18], [75], [70, 3, 41, 33]],
                         ids=["batch1", "ragged", "chunked", "ragged-chunked"])
def test_cuda_aoti_greedy_equals_eager(engines, lengths):
    aoti, eager = engines
    batch = prompts(lengths, seed=len(lengths) * 100 + max(lengths))
    ours = aoti.generate(batch, max_new_tokens=16)
    ref = eager.generate(batch, max_new_tokens=16)
    print(f"CUDA AOTI engine vs eager, prompts {lengths}: {(ours == ref).float().mean().item():.4f} of ids equal; "
          f"prefill {1e3 * aoti.stats.prefill_s:.1f} ms, decode {aoti.stats.decode_ms_per_step:.2f} ms/step")
    assert torch.equal(ours, ref)


def test_cuda_seeded_sampling_is_reproducible(engines):
    aoti, eager = engines
    batch = prompts([12, 40], seed=1)
    kwargs = dict(max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=7)
    a = aoti.generate(batch, **kwargs)
    assert torch.equal(a, aoti.generate(batch, **kwargs))
    assert torch.equal(a, eager.generate(batch, **kwargs))


def test_cuda_engine_refuses_cpu(engine_dir):
    with pytest.raises(EngineFolderError, match="built for 'cuda' and cannot run on 'cpu'"):
        Engine.load(engine_dir, device="cpu")
