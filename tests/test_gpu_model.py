"""GPU suite for the whole model: Triton kernels inside the model and inside an AOTInductor CUDA engine.

Run on a CUDA machine with ``python -m pytest -m gpu``. On the project's H100 image AOTInductor packages load only
with ``LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6`` (see ../shared/reference/tensorrt_notes.md §11).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model import MiniMaxConfig, MiniMaxForCausalLM
from tests.utils import logit_report

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# The tiny preset with head_dim 64 (a size the Triton kernels take) and a longer lightning block.
CONFIG = dataclasses.replace(MiniMaxConfig.preset("tiny"), head_dim=64, rotary_dim=32)


def _models():
    cpu = MiniMaxForCausalLM(CONFIG).init_random_weights(seed=4, std=0.05).eval()
    gpu = MiniMaxForCausalLM(CONFIG).to("cuda").eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.model.reset_buffers()
    return cpu, gpu


@torch.no_grad()
def test_model_on_gpu_with_triton_kernels_matches_cpu_reference():
    cpu, gpu = _models()
    ids = torch.randint(0, CONFIG.vocab_size, (3, 301), generator=torch.Generator().manual_seed(0))
    ref = cpu(ids)
    out = gpu(ids.cuda()).cpu()
    report = logit_report(out, ref)
    print("GPU fp32 (Triton kernels, TF32 off) vs CPU reference:", report)
    assert report["rel"] < 1e-3 and report["top1"] > 0.99, report
    # prefill + decode on the GPU equals the whole forward on the CPU
    state = gpu.new_state(3, 310, page_size=64)
    logits, state = gpu.prefill(ids[:, :290].cuda(), state)
    steps = [logits]
    for t in range(290, 301):
        logits, state = gpu.decode(ids[:, t : t + 1].cuda(), torch.full((3,), t, device="cuda"), state)
        steps.append(logits)
    report = logit_report(torch.cat(steps, 1).cpu(), ref)
    print("GPU prefill + 11 decode steps vs CPU whole forward:", report)
    assert report["rel"] < 1e-3 and report["top1"] > 0.99, report


@torch.no_grad()
def test_bf16_model_on_gpu_tracks_fp32_reference():
    cpu, _ = _models()
    gpu = MiniMaxForCausalLM(CONFIG, dtype=torch.bfloat16).to("cuda").eval()
    gpu.load_state_dict({k: v.to(gpu.state_dict()[k].dtype) for k, v in cpu.state_dict().items()})
    gpu.model.reset_buffers()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 77), generator=torch.Generator().manual_seed(1))
    report = logit_report(gpu(ids.cuda()).cpu(), cpu(ids))
    print("GPU bf16 vs CPU fp32 reference:", report)
    assert report["rel"] < 5e-2 and report["top1"] > 0.9, report


@torch.no_grad()
def test_aoti_cuda_engine_equals_eager(tmp_path):
    from export import BuildSettings, build_engine
    from export.exporting import DecodeProgram, PrefillProgram
    from tests.test_export import _run_steps

    _, gpu = _models()
    settings = BuildSettings(backend="aoti", device="cuda", dtype="float32", max_batch=4, max_input_len=64,
                             max_seq_len=96, page_size=16)  # prompts and decode steps cross pages
    manifest = build_engine(gpu, settings, tmp_path / "engine")
    from runtime.backends import load_aoti_programs

    programs = load_aoti_programs(tmp_path / "engine", manifest, torch.device("cuda", torch.cuda.current_device()))
    prefill, decode = programs["prefill"].fn, programs["decode"].fn
    assert manifest["device"] == "cuda"
    ids = torch.randint(0, CONFIG.vocab_size, (3, 61), generator=torch.Generator().manual_seed(2)).cuda()

    ours, _ = _run_steps(prefill, decode, ids, 53, settings, CONFIG)
    ref, _ = _run_steps(PrefillProgram(gpu), DecodeProgram(gpu), ids, 53, settings, CONFIG)
    report = logit_report(ours.cpu(), ref.cpu())
    print("AOTI CUDA engine vs eager (GPU), prefill 53 + 8 decode steps:", report)
    assert report["rel"] < 1e-4 and report["top1"] == 1.0, report
