"""The custom ops as ``triton_op``s: traced launches (``kernels/*/traced.py``) and CUDA AOTInductor packages that hold
the Triton kernels.

CPU (CI): the traced launchers against the fp32 reference in Triton's interpreter (concrete sizes), and
``torch.export`` of the traced launchers with dynamic sizes in a subprocess without the interpreter (the launches
are recorded, not run): no guard on the dynamic sizes (a guard would make export fail on the declared ranges) and
the expected kernel chain for each static choice.

GPU (``-m gpu``): a program with every op, exported with dynamic sizes and compiled with AOTInductor on CUDA; the
package must hold ``.cubin`` files and no extern ``minimax::`` call, and, loaded in a subprocess that never imports
``kernels`` (the ``minimax`` ops are not registered there), must equal eager (fp32 and bf16).
AOTInductor packages load on the project's H100 image only with ``LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6``
(../shared/reference/tensorrt_notes.md §11); the subprocess gets it.
"""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import kernels  # noqa: E402, F401
from kernels.lightning_attention import naive as lnaive  # noqa: E402
from kernels.moe import naive as mnaive  # noqa: E402
from tests.utils import rel_err  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5 if DEVICE == "cpu" else 1e-4  # GPU fp32 products use tf32x3
LIBSTDCXX = "/lib/x86_64-linux-gnu/libstdc++.so.6"


def _moe_inputs(T, E=5, hidden=32, inter=48, seed=0, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden, generator=g)
    router = torch.randn(E, hidden, generator=g)
    w1 = torch.randn(E, inter, hidden, generator=g) / hidden**0.5
    w3 = torch.randn(E, inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(E, hidden, inter, generator=g) / inter**0.5
    return x.to(device, dtype), router.to(device), *(w.to(device, dtype) for w in (w1, w3, w2))


def _lightning_inputs(B, T, H=3, dk=16, dv=32, seed=0, dtype=torch.float32, device=DEVICE):
    """q, k, v as strided views of one [B, T, H, 2 dk + dv] tensor (as the model passes them)."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, H, 2 * dk + dv, generator=g) * 0.5).to(device, dtype)
    q, k, v = qkv.split([dk, dk, dv], dim=-1)
    s = torch.rand(H, generator=g).to(device) * 0.5
    state = torch.randn(B, H, dk, dv, generator=g).to(device)
    return q, k, v, s, state


# ------------------------------------------------------------------------------- traced launchers, CPU interpreter


@pytest.mark.parametrize("path", ["decode", "grouped"])
@pytest.mark.parametrize("T", [1, 5, 37])
def test_traced_moe_matches_reference(T, path):
    from kernels.moe.traced import moe_forward_traceable, static_config

    if path == "decode" and T > 16:
        pytest.skip("the decode path takes T <= 16")
    args = _moe_inputs(T, seed=T)
    decode = path == "decode"
    cfg = static_config(T, 2, 5, torch.device(DEVICE), decode_kernels=decode)
    assert cfg.decode_max_tokens == (16 if decode else 0)
    out = moe_forward_traceable(*args, 2, config=cfg, decode_kernels=decode)
    ref = mnaive.moe_forward(*args, 2)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    assert rel_err(out, ref) < FP32_TOL


@pytest.mark.parametrize("B,T", [(1, 1), (2, 37)])
def test_traced_lightning_matches_reference(B, T):
    from kernels.lightning_attention.traced import lightning_decode_traceable, lightning_prefill_traceable

    q, k, v, s, state = _lightning_inputs(B, T, seed=T)
    o, fs = lightning_prefill_traceable(q, k, v, s, state)
    o_ref, fs_ref = lnaive.lightning_attention_blockwise(q, k, v, s, state)
    assert o.is_contiguous() and fs.is_contiguous() and fs.dtype == torch.float32
    assert rel_err(o, o_ref) < FP32_TOL and rel_err(fs, fs_ref) < FP32_TOL
    o1, ns = lightning_decode_traceable(q[:, :1], k[:, :1], v[:, :1], s, state)
    o1_ref, ns_ref = lnaive.lightning_attention_decode_step(q[:, :1], k[:, :1], v[:, :1], s, state)
    assert o1.is_contiguous() and ns.is_contiguous()
    assert rel_err(o1, o1_ref) < FP32_TOL and rel_err(ns, ns_ref) < FP32_TOL


# ------------------------------------------------------------------------------- export of the traced launchers

_EXPORT_SCRIPT = r"""
import json, torch
from torch.export import Dim
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from kernels.moe.traced import moe_forward_traceable
from kernels.lightning_attention.traced import lightning_decode_traceable, lightning_prefill_traceable

class Program(torch.nn.Module):
    def __init__(self, part):
        super().__init__()
        self.part = part

    def forward(self, *a):
        if self.part == "moe":
            return moe_forward_traceable(*a, 2)
        if self.part == "moe_decode_kernels":
            return moe_forward_traceable(*a, 2, decode_kernels=True)
        if self.part == "prefill":
            return lightning_prefill_traceable(*a)
        return lightning_decode_traceable(*a)

def moe_args(T):
    return (torch.randn(T, 32), torch.randn(5, 32), torch.randn(5, 48, 32), torch.randn(5, 48, 32), torch.randn(5, 32, 48))

cases = {
    # name: (part, example args, dynamic shapes)
    "moe_small": ("moe", moe_args(5), ({0: Dim("t", min=1, max=16)}, None, None, None, None)),
    "moe_small_decode": ("moe_decode_kernels", moe_args(5), ({0: Dim("t", min=1, max=16)}, None, None, None, None)),
    "moe_any_decode": ("moe_decode_kernels", moe_args(40), ({0: Dim("t", min=1, max=64)}, None, None, None, None)),
    "moe_any": ("moe", moe_args(40), ({0: Dim("t", min=1, max=4096)}, None, None, None, None)),
    "moe_large": ("moe", moe_args(600), ({0: Dim("t", min=256, max=4096)}, None, None, None, None)),
    "prefill": ("prefill", (*(torch.randn(3, 37, 2, 16) for _ in range(3)), torch.rand(2), torch.randn(3, 2, 16, 16)),
                tuple({0: Dim("b", min=1, max=64), 1: Dim("l", min=1, max=8192)} for _ in range(3))
                + (None, {0: Dim("b", min=1, max=64)})),
    "decode": ("decode", (*(torch.randn(3, 1, 2, 16) for _ in range(3)), torch.rand(2), torch.randn(3, 2, 16, 16)),
               tuple({0: Dim("b", min=1, max=1024)} for _ in range(3)) + (None, {0: Dim("b", min=1, max=1024)})),
}
result = {}
for name, (part, args, dyn) in cases.items():
    ep = torch.export.export(Program(part), args, dynamic_shapes=(dyn,))
    launches = []
    for node in ep.graph.nodes:
        if "triton_kernel_wrapper" in str(node.target):
            launches.append(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
    result[name] = {"launches": launches, "ranges": sorted(str(r) for r in ep.range_constraints.values())}
print("RESULT" + json.dumps(result))
"""


def test_traced_launchers_export_without_guards():
    """Exported with dynamic sizes (ranges below), the traced launchers add no guard (export would raise on a guard
    that narrows a declared range) and take the static choices the module docstrings describe."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # record launches, do not run them
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", _EXPORT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.split("RESULT", 1)[1])
    names = {case: res["launches"] for case, res in result.items()}
    grouped = ["_route_kernel", "_align_kernel", "_swiglu_grouped_kernel", "_down_grouped_kernel", "_combine_kernel"]
    decode = ["_route_kernel", "_swiglu_decode_kernel", "_down_combine_decode_kernel"]
    # the op takes the decode kernels only where T <= 16 holds over the whole range (kernels/moe/traced.py)
    assert names["moe_small"] == decode and names["moe_any"] == grouped and names["moe_large"] == grouped
    assert names["moe_small_decode"] == decode
    assert names["moe_any_decode"] == grouped
    assert names["prefill"] == ["_lightning_prefill_kernel"] and names["decode"] == ["_lightning_decode_kernel"]
    # the declared ranges survive (no specialisation)
    assert result["moe_any"]["ranges"] == ["VR[1, 4096]"] and result["moe_large"]["ranges"] == ["VR[256, 4096]"]
    assert sorted(result["prefill"]["ranges"]) == ["VR[1, 64]", "VR[1, 8192]"]


# ------------------------------------------------------------------------------- CUDA AOTInductor packages

_LOAD_SCRIPT = r"""
import sys, torch
pkg, inputs_path, out_path = sys.argv[1:4]
program = torch._inductor.aoti_load_package(pkg)
assert "kernels" not in sys.modules
try:
    torch.ops.minimax.moe
    raise SystemExit("minimax::moe is registered in the loading process")
except (AttributeError, RuntimeError):
    pass
outs = [[o.cpu() for o in program(*[a.cuda() for a in args])] for args in torch.load(inputs_path)]
torch.save(outs, out_path)
"""


class _AllOps(torch.nn.Module):
    """One call of each op per dtype (fp32, bf16); the MoE twice: T in [1, 16] and T in [1, 512]."""

    DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, E=5, hidden=64, inter=48):
        super().__init__()
        self.weights = torch.nn.ParameterList()
        for dtype in self.DTYPES:
            _, router, w1, w3, w2 = _moe_inputs(1, E, hidden, inter, seed=7, dtype=dtype, device="cuda")
            self.weights.extend(torch.nn.Parameter(t, requires_grad=False) for t in (router, w1, w3, w2))

    def moe_weights(self, i):
        return list(self.weights[4 * i : 4 * i + 4])

    def forward(self, *inputs):
        outs = []
        for i in range(len(self.DTYPES)):
            q, k, v, s, state, q1, k1, v1, x_small, x_big = inputs[10 * i : 10 * i + 10]
            router, w1, w3, w2 = self.moe_weights(i)
            o, fs = torch.ops.minimax.lightning_prefill(q, k, v, s, state)
            o1, ns = torch.ops.minimax.lightning_decode(q1, k1, v1, s, fs)
            outs += [o, fs, o1, ns, torch.ops.minimax.moe(x_small, router, w1, w3, w2, 2),
                     torch.ops.minimax.moe(x_big, router, w1, w3, w2, 2)]
        return tuple(outs)


def _all_ops_inputs(B, T, T_small, T_big, seed):
    args = []
    for dtype in _AllOps.DTYPES:
        # contiguous: a package assumes the strides of the exported inputs (views stay views only inside a program)
        q, k, v, s, state = (a.contiguous() for a in _lightning_inputs(B, T, H=2, dk=16, dv=32, seed=seed,
                                                                       dtype=dtype, device="cuda"))
        q1, k1, v1, _, _ = (a.contiguous() for a in _lightning_inputs(B, 1, H=2, dk=16, dv=32, seed=seed + 1,
                                                                      dtype=dtype, device="cuda"))
        x_small = _moe_inputs(T_small, hidden=64, seed=seed + 2, dtype=dtype, device="cuda")[0]
        x_big = _moe_inputs(T_big, hidden=64, seed=seed + 3, dtype=dtype, device="cuda")[0]
        args += [q, k, v, s, state, q1, k1, v1, x_small, x_big]
    return tuple(args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_cuda_aoti_package_holds_triton_kernels_and_runs_without_the_ops(tmp_path):
    """One package (fp32 and bf16 op sets in one program, to compile once) against eager and the fp32 reference."""
    from torch.export import Dim

    model = _AllOps().eval()
    dyn = ()
    for i, _ in enumerate(_AllOps.DTYPES):
        b, t = Dim(f"b{i}", min=1, max=8), Dim(f"t{i}", min=1, max=256)
        dyn += (*({0: b, 1: t} for _ in range(3)), None, {0: b}, *({0: b} for _ in range(3)),
                {0: Dim(f"ts{i}", min=1, max=16)}, {0: Dim(f"tb{i}", min=1, max=512)})
    ep = torch.export.export(model, _all_ops_inputs(2, 37, 5, 40, seed=0), dynamic_shapes=(dyn,))
    targets = [str(n.target) for n in ep.graph.nodes if str(n.target).startswith("minimax.")]
    assert targets == ["minimax.lightning_prefill.default", "minimax.lightning_decode.default",
                       "minimax.moe.default", "minimax.moe.default"] * 2
    pkg = tmp_path / "all_ops.pt2"
    torch._inductor.aoti_compile_and_package(ep, package_path=str(pkg))

    with zipfile.ZipFile(pkg) as z:
        names = z.namelist()
        cubins = [n for n in names if n.endswith(".cubin")]
        extern_json = "".join(z.read(n).decode("utf-8", "replace") for n in names if n.endswith(".json"))
        wrapper_cpp = "".join(z.read(n).decode("utf-8", "replace") for n in names if n.endswith(".cpp"))
    print(f"package: {len(names)} files, {len(cubins)} cubin")
    # per dtype 7 distinct kernels: lightning prefill, decode; MoE route, align, swiglu_grouped, down_grouped, combine
    assert len(cubins) >= 14, names
    # no extern call back into the op registry: no proxy-executor node naming a minimax op
    assert "minimax::" not in extern_json, extern_json[:2000]
    assert "proxy_executor_call_function" not in wrapper_cpp

    sizes = [(1, 1, 1, 1), (3, 61, 16, 300), (8, 256, 7, 512), (2, 17, 16, 17)]  # (B, T, T_small, T_big)
    inputs = [_all_ops_inputs(*sz, seed=10 * i) for i, sz in enumerate(sizes)]
    torch.save([[a.cpu() for a in args] for args in inputs], tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["LD_PRELOAD"] = LIBSTDCXX
    r = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(pkg), str(tmp_path / "inputs.pt"),
                        str(tmp_path / "outputs.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    outs = torch.load(tmp_path / "outputs.pt")

    # eager: the same ops (eager CUDA: the tuned launchers); reference: fp32 on the CPU
    failures = []
    for sz, args, got in zip(sizes, inputs, outs):
        want = [o.cpu() for o in model(*args)]
        assert len(got) == len(want)
        for i, dtype in enumerate(_AllOps.DTYPES):
            q, k, v, s, state, q1, k1, v1, xs, xb = (a.cpu() for a in args[10 * i : 10 * i + 10])
            weights = [t.cpu() for t in model.moe_weights(i)]
            o_ref, fs_ref = lnaive.lightning_attention_blockwise(q, k, v, s, state)
            o1_ref, ns_ref = lnaive.lightning_attention_decode_step(q1, k1, v1, s, fs_ref)
            ref = [o_ref, fs_ref, o1_ref, ns_ref, mnaive.moe_forward(xs, *weights, 2), mnaive.moe_forward(xb, *weights, 2)]
            tol_eager = 1e-5 if dtype == torch.float32 else 1e-2  # tiles may differ from eager's: summation order
            tol_ref = 1e-4 if dtype == torch.float32 else 3e-2
            for name, g_, w_, r_ in zip(["o", "final_state", "o1", "new_state", "y_small", "y_big"],
                                        got[6 * i : 6 * i + 6], want[6 * i : 6 * i + 6], ref):
                assert g_.shape == w_.shape and g_.dtype == w_.dtype, (sz, name)
                e_eager, e_ref = rel_err(g_, w_), rel_err(g_, r_)
                print(f"{dtype} sizes {sz} {name}: rel err vs eager {e_eager:.2e}, vs fp32 reference {e_ref:.2e}")
                if not (e_eager < tol_eager and e_ref < tol_ref):
                    failures.append((dtype, sz, name, e_eager, e_ref))
    assert not failures, failures
