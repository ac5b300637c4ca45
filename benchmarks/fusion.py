"""Does fusing SiLU (q/k/v) or the RMSNorm + sigmoid-gate epilogue into the lightning kernels pay? Per-kernel profile.

    python -m benchmarks.fusion --out benchmarks/results/fusion.json [--modes default max-autotune-no-cudagraphs]
    python -m benchmarks.fusion --tiny --device cpu --out /tmp/fusion.json      (code path check, no GPU)

One real-width lightning attention layer (``LightningAttention`` of ``model/modeling.py`` with random weights; MiniMax
sizes: hidden 6144, H=64, D=128, bf16, layer-0 decays), compiled by ``torch.compile`` (``--modes``: ``default`` is
the Inductor configuration that ``export/aoti_lowering.py`` packages with AOTInductor; ``max-autotune-no-cudagraphs``
autotunes the GEMMs and may fuse pointwise epilogues into Triton GEMM templates). Cases: prefill B=1 at each
``--lengths`` (zero initial state, no pads) and decode at each ``--batches``. Each case is run under
``torch.profiler``; the device kernels of the layer are grouped

    gemm        qkv_proj, output_gate, out_proj (cuBLAS / CUTLASS / Inductor GEMM templates, epilogues included)
    lightning   our prefill / decode kernel (``chunk.py`` / ``recurrent.py``; ``fused.py`` in the fused variant)
    silu        the pointwise kernel(s) computing SiLU of the qkv projection (with the pad ``where`` of prefill)
    norm_gate   the RMSNorm (8192 wide) + sigmoid(output_gate) * o kernel(s)
    other       anything else (copies, fills)

and each group's time per layer call, its share of the layer's GPU time, and for the pointwise groups the bytes they
must move (read + write, ideal) against the copy ceiling are reported. A fusion saves at most the time of the
pointwise kernels it removes; that bound is reported as a % of the layer. With ``--fused`` (on by default on CUDA)
prefill also runs a variant whose lightning op applies SiLU on load (``kernels/lightning_attention/fused.py``), so the
real saving (and any slowdown of our kernel) is measured, not only bounded. The JSON keeps every kernel's name and
time, so the grouping can be redone offline.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import environment, measure_ceilings, time_ms, write_json

logger = logging.getLogger(__name__)

GROUPS = ("gemm", "lightning", "silu", "norm_gate", "other")
GEMM_LABELS = ("qkv_proj", "output_gate", "out_proj")


# ----------------------------------------------------------------------------------------------- kernel grouping
def classify_kernel(name: str) -> str:
    """Group of one device kernel (or, on the CPU, one top-level op) by its name; see the module docstring.

    Inductor names its kernels after the aten ops they fuse (``triton_poi_fused_silu_where_0``,
    ``triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_sigmoid_1``, ``triton_tem_fused_mm_silu_2``): a GEMM template
    with a fused epilogue is a GEMM (its epilogue is already free), a pointwise kernel with ``silu`` in it is the SiLU,
    one with the norm's ``rsqrt``/``mean`` or the gate's ``sigmoid`` is the epilogue.
    """
    n = name.lower()
    if "lightning" in n:
        return "lightning"
    gemm_marks = ("gemm", "cutlass", "nvjet", "xmma", "triton_tem", "_mm_", "aten::mm", "aten::addmm", "aten::linear",
                  "aten::matmul", "aten::bmm", "splitkreduce", "cublas", "mkldnn", "mm_template")
    if any(m in n for m in gemm_marks) or n.endswith("_mm") or "fused_mm" in n:
        return "gemm"
    if "silu" in n:
        return "silu"
    if any(m in n for m in ("rsqrt", "sigmoid", "mean", "pow", "rms_norm", "rmsnorm")):
        return "norm_gate"
    return "other"


def label_gemms(timeline: list[dict[str, Any]]) -> None:
    """Name the GEMMs of one layer call in place: with exactly three, the longest is ``qkv_proj`` (3x the FLOPs of
    the others), the last of the other two ``out_proj`` (it consumes everything), the remaining one ``output_gate``."""
    gemms = [k for k in timeline if k["group"] == "gemm"]
    if len(gemms) != 3:
        for k in gemms:
            k["gemm"] = "unlabelled"
        return
    qkv = max(gemms, key=lambda k: k["us"])
    rest = [k for k in gemms if k is not qkv]
    qkv["gemm"], rest[0]["gemm"], rest[1]["gemm"] = "qkv_proj", "output_gate", "out_proj"


def summarize(kernels: Iterable[tuple[str, float]], iters: int) -> dict[str, Any]:
    """Per-call totals of (name, microseconds) pairs gathered over ``iters`` layer calls.

    Returns ``{"layer_gpu_us", "groups": {group: {"us", "share", "kernels"}}, "kernels": [{name, group, us, calls}]}``
    with times per layer call (``us`` summed over the kernel's launches in one call) and shares of ``layer_gpu_us``.
    """
    if iters < 1:
        raise ValueError(f"benchmarks.fusion.summarize: iters must be >= 1; got {iters}")
    per_name: dict[str, list[float]] = {}
    for name, us in kernels:
        per_name.setdefault(name, []).append(us)
    rows = [{"name": n, "group": classify_kernel(n), "us": sum(t) / iters, "calls": len(t) / iters}
            for n, t in per_name.items()]
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows)
    groups = {}
    for g in GROUPS:
        us = sum(r["us"] for r in rows if r["group"] == g)
        groups[g] = {"us": us, "share": us / total if total > 0 else 0.0,
                     "kernels": [r["name"] for r in rows if r["group"] == g]}
    return {"layer_gpu_us": total, "groups": groups, "kernels": rows}


# ----------------------------------------------------------------------------------------------- the layer
def build_layer(tiny: bool, device: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """``LightningAttention`` (layer 0) with random weights at MiniMax sizes (``tiny``: the tiny preset)."""
    from model.config import MiniMaxConfig
    from model.modeling import LightningAttention

    config = MiniMaxConfig.preset("tiny" if tiny else "minimax-text-01")
    torch.manual_seed(0)
    with torch.device(device):
        layer = LightningAttention(config, layer_idx=0, dtype=dtype)
    for lin in (layer.qkv_proj, layer.output_gate, layer.out_proj):
        nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    layer.reset_buffers()
    return layer.eval(), config


class LayerStep(nn.Module):
    """One call of the layer as the model makes it: ``(x, positions, state) -> (y, new_state)``.

    ``fused=True`` (prefill only) replaces ``silu -> where -> minimax::lightning_prefill`` by
    ``minimax::lightning_prefill_silu`` on the pre-activation views (``kernels/lightning_attention/fused.py``); the
    norm, gate and projections are the layer's own.
    """

    def __init__(self, layer: nn.Module, decode: bool, fused: bool = False):
        super().__init__()
        if fused and decode:
            raise ValueError("benchmarks.fusion: the fused variant is prefill only")
        self.layer, self.decode, self.fused = layer, decode, fused

    def forward(self, x: Tensor, positions: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        from model.modeling import _StepContext

        if not self.fused:
            empty = x.new_empty(0, dtype=torch.float32)
            ctx = _StepContext(decode=self.decode, token_positions=positions, cos=empty, sin=empty)
            y, (new_state,) = self.layer(x, ctx, (state,))
            return y, new_state
        a = self.layer
        B, T, _ = x.shape
        H, D = a.num_heads, a.head_dim
        q, k, v = a.qkv_proj(x).view(B, T, H, 3 * D).split(D, dim=-1)  # pre-activation views
        o, new_state = torch.ops.minimax.lightning_prefill_silu(q, k, v, a.decay_rate, state, positions)
        o = a.norm(o.reshape(B, T, H * D))
        o = torch.sigmoid(a.output_gate(x)) * o
        return a.out_proj(o), new_state


# ----------------------------------------------------------------------------------------------- profiling
def profile_kernels(fn: Callable[[], Any], iters: int, device: str) -> list[tuple[str, float, float]]:
    """(name, start_us, duration_us) of the device kernels run by ``iters`` calls of ``fn`` (on the CPU: of the
    outermost ops that ``classify_kernel`` places in a group other than "other", else the leaf ops)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device == "cuda":
        return [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in events
                if e.device_type == DeviceType.CUDA]
    out = []

    def walk(e: Any) -> None:
        if classify_kernel(e.name) != "other" or not e.cpu_children:
            out.append((e.name, e.time_range.start, e.self_cpu_time_total if not e.cpu_children
                        else e.time_range.elapsed_us()))
            return
        for c in e.cpu_children:
            walk(c)

    for e in events:
        if e.device_type == DeviceType.CPU and e.cpu_parent is None:
            walk(e)
    return out


def last_call_timeline(kernels: list[tuple[str, float, float]], iters: int) -> list[dict[str, Any]]:
    """The kernels of the last of ``iters`` equal calls, in launch order, grouped, GEMMs labelled."""
    per_call = len(kernels) // iters
    last = sorted(kernels, key=lambda k: k[1])[len(kernels) - per_call:] if per_call else []
    timeline = [{"name": n, "group": classify_kernel(n), "us": us} for n, _, us in last]
    label_gemms(timeline)
    return timeline


def pointwise_bytes(B: int, T: int, H: int, D: int, itemsize: int) -> dict[str, int]:
    """Bytes the pointwise groups must move at the least (read + write once): SiLU reads the [B*T, 3HD] projection
    and writes q, k, v; the epilogue reads o and the gate projection [B*T, HD] and writes the gated o."""
    n = B * T
    return {"silu": 2 * n * 3 * H * D * itemsize, "norm_gate": 3 * n * H * D * itemsize}


def run_case(layer: nn.Module, config: Any, kind: str, B: int, T: int, mode: str | None, fused: bool,
             device: str, dtype: torch.dtype, iters: int, copy_tbps: float | None) -> tuple[dict[str, Any], Tensor]:
    """Compile, time and profile one case; returns its JSON row and the layer output (for cross-checks)."""
    H, D = config.num_attention_heads, config.head_dim
    decode = kind == "decode"
    torch._dynamo.reset()  # every case compiles afresh (the recompile limit would silently fall back to eager)
    step = LayerStep(layer, decode=decode, fused=fused)
    fn = step if mode is None else torch.compile(step, mode=None if mode == "default" else mode, dynamic=False)
    g = torch.Generator(device=device).manual_seed(B * 100003 + T)
    x = torch.randn(B, T, config.hidden_size, device=device, dtype=dtype, generator=g)
    positions = torch.arange(T, device=device).expand(B, T).contiguous()
    if decode:
        positions = positions + 1000
    state = torch.randn(B, H, D, D, device=device, generator=g) * 0.01 if decode else torch.zeros(B, H, D, D, device=device)
    call = lambda: fn(x, positions, state)  # noqa: E731
    t0 = time.perf_counter()
    with torch.no_grad():
        y, _ = call()  # compiles
        if device == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        layer_ms = time_ms(call, warmup=3, iters=iters) if device == "cuda" else None
        kernels = profile_kernels(call, iters, device)
    summary = summarize(((n, us) for n, _, us in kernels), iters)
    row: dict[str, Any] = {
        "kind": kind, "B": B, "T": T, "mode": mode or "eager", "variant": "fused_silu" if fused else "baseline",
        "compile_s": compile_s, "layer_ms_events": layer_ms, **summary,
        "timeline": last_call_timeline(kernels, iters),
        "output_finite": bool(torch.isfinite(y.float()).all()),
    }
    if copy_tbps and not fused:
        need = pointwise_bytes(B, T, H, D, torch.empty((), dtype=dtype).element_size())
        for grp, nbytes in need.items():
            us = summary["groups"][grp]["us"]
            ideal_us = nbytes / (copy_tbps * 1e12) * 1e6
            row["groups"][grp].update(
                bytes=nbytes, ideal_us_at_copy=ideal_us,
                frac_of_copy=(ideal_us / us) if us > 0 else None,
                fusion_bound_share=us / summary["layer_gpu_us"] if summary["layer_gpu_us"] else 0.0,
            )
    return row, y


def kernel_only(T: int, H: int, D: int, copy_tbps: float) -> dict[str, Any]:
    """Our prefill kernel alone on SiLU'd q/k/v against the fused-SiLU kernel on the pre-activation views (with and
    without the pad mask), B=1, bf16, zero initial state: the fused kernel's own cost, outside the layer."""
    from kernels.lightning_attention.chunk import lightning_prefill_triton
    from kernels.lightning_attention.fused import lightning_prefill_silu_triton

    g = torch.Generator(device="cuda").manual_seed(T)
    pre = torch.randn(1, T, H, 3 * D, device="cuda", generator=g).bfloat16()  # interleaved [q|k|v] per head
    act = F.silu(pre)
    s = minimax_rates(H).cuda()
    positions = torch.arange(T, device="cuda")[None]
    q, k, v = act.split(D, dim=-1)
    pq, pk, pv = pre.split(D, dim=-1)
    silu_ms = time_ms(lambda: F.silu(pre), warmup=3, iters=10)
    base_ms = time_ms(lambda: lightning_prefill_triton(q, k, v, s), warmup=3, iters=10)
    fused_ms = time_ms(lambda: lightning_prefill_silu_triton(pq, pk, pv, s, None, positions), warmup=3, iters=10)
    fused_nopos_ms = time_ms(lambda: lightning_prefill_silu_triton(pq, pk, pv, s), warmup=3, iters=10)
    # diagnostics: the same fused kernel without the activation; the plain kernel on the interleaved views
    fused_nosilu_ms = time_ms(lambda: lightning_prefill_silu_triton(pq, pk, pv, s, None, positions, apply_silu=False),
                              warmup=3, iters=10)
    base_strided_ms = time_ms(lambda: lightning_prefill_triton(pq, pk, pv, s), warmup=3, iters=10)
    o_ref, S_ref = lightning_prefill_triton(q, k, v, s)
    o, S = lightning_prefill_silu_triton(pq, pk, pv, s, None, positions)
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    qkvo = 4 * T * H * D * 2
    return {"T": T, "silu_eager_ms": silu_ms, "ours_ms": base_ms, "fused_ms": fused_ms, "fused_no_positions_ms": fused_nopos_ms,
            "fused_kernel_without_silu_ms": fused_nosilu_ms, "ours_on_interleaved_views_ms": base_strided_ms,
            "ours_frac_of_copy_qkvo": qkvo / (base_ms * 1e-3) / 1e12 / copy_tbps,
            "fused_frac_of_copy_qkvo": qkvo / (fused_ms * 1e-3) / 1e12 / copy_tbps,
            "rel_diff_o": rel(o, o_ref), "rel_diff_state": rel(S, S_ref)}


def minimax_rates(heads: int) -> Tensor:
    from benchmarks.lightning import minimax_rates as rates

    return rates(heads)


def _fmt_row(r: dict[str, Any]) -> str:
    g = r["groups"]
    cells = " ".join(f"{g[k]['us']:9.1f} ({100 * g[k]['share']:4.1f}%)" for k in GROUPS)
    case = f"{r['kind']} B={r['B']} T={r['T']}"
    return f"{case:24} {r['mode'][:12]:12} {r['variant']:10} {r['layer_gpu_us']:9.1f} {cells}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/fusion.json", help="JSON output path")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny preset sizes (CPU code-path check)")
    parser.add_argument("--modes", nargs="+", default=["default", "max-autotune-no-cudagraphs"],
                        help="torch.compile modes ('default' = Inductor defaults, as AOTInductor; 'eager' = none)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 4096], help="prefill lengths (B=1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="decode batch sizes")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused-SiLU prefill variant")
    parser.add_argument("--iters", type=int, default=10, help="profiled layer calls per case")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.fusion needs a CUDA GPU (or --device cpu)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.tiny:
        args.lengths = sorted({min(t, 40) for t in args.lengths})
    env = environment()
    print(f"device {env['device']}  torch {env['torch']}  triton {env['triton']}", flush=True)
    ceilings = measure_ceilings() if args.device == "cuda" else {}
    copy_tbps = ceilings.get("copy_tbps")
    layer, config = build_layer(args.tiny, args.device, dtype)
    fused_ok = not args.no_fused and (args.device == "cuda" or args.tiny)
    if fused_ok:
        import kernels.lightning_attention.fused as _fused  # registers minimax::lightning_prefill_silu

        logger.info("fused variant: %s", _fused.__name__)
    payload: dict[str, Any] = {
        "environment": env,
        "command": " ".join(["python -m benchmarks.fusion", *(argv if argv is not None else sys.argv[1:])]),
        "ceilings": ceilings,
        "layer": {"hidden": config.hidden_size, "H": config.num_attention_heads, "D": config.head_dim,
                  "dtype": str(dtype).removeprefix("torch."), "layer_idx": 0},
        "cases": [],
    }
    cases = [("prefill", 1, T, False) for T in args.lengths] + [("decode", B, 1, False) for B in args.batches]
    if fused_ok:
        cases += [("prefill", 1, T, True) for T in args.lengths]
    print(f"{'case':24} {'mode':12} {'variant':10} {'layer us':>9} "
          + " ".join(f"{g:>17}" for g in GROUPS), flush=True)
    if fused_ok and args.device == "cuda":
        payload["kernel_only"] = []
        for T in args.lengths:
            try:
                payload["kernel_only"].append(kernel_only(T, config.num_attention_heads, config.head_dim, copy_tbps))
            except Exception as exc:  # noqa: BLE001
                payload["kernel_only"].append({"T": T, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            print("  kernel only", payload["kernel_only"][-1], flush=True)
    baseline_out: dict[tuple[str, int], Tensor] = {}
    for mode in args.modes:
        for kind, B, T, fused in cases:
            try:
                row, y = run_case(layer, config, kind, B, T, None if mode == "eager" else mode, fused, args.device,
                               dtype, args.iters, copy_tbps)
            except Exception as exc:  # noqa: BLE001 - a case that fails is a result; the others still run
                row = {"kind": kind, "B": B, "T": T, "mode": mode, "variant": "fused_silu" if fused else "baseline",
                       "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
                print(f"  {kind} B={B} T={T} {mode} fused={fused}: {row['error']}", flush=True)
            else:
                if kind == "prefill" and not fused:
                    baseline_out[(mode, T)] = y
                elif fused and (mode, T) in baseline_out:  # same weights and input: the layer outputs must agree
                    ref = baseline_out.pop((mode, T)).double()
                    row["rel_diff_vs_baseline"] = ((y.double() - ref).norm() / ref.norm()).item()
                print(_fmt_row(row), flush=True)
            payload["cases"].append(row)
            write_json(args.out, payload)  # after every case: a run cut short keeps what it measured
            if args.device == "cuda":
                torch.cuda.empty_cache()
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
