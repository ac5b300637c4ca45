"""Lightning attention on the GPU: our Triton prefill/decode against the device ceilings and FLA, in one process.

    python -m benchmarks.lightning --out benchmarks/results/lightning.json [--quick] [--sweep]

Measures (H=64, D=128, MiniMax layer-0 decays s_h = 2^(-(h+1)/8), fp32 state):
  * ceilings: device-to-device copy bandwidth (read + write) and a bf16 8192^3 matmul (benchmarks/common.py);
  * prefill, B=1, bf16, T in {16K, 32K, 64K, 128K}: ours (``chunk.py``) and FLA ``chunk_simple_gla`` (g_gamma=-s,
    scale=1, initial state in, final state out); bandwidth counts q, k, v, o once (the state is reported apart);
  * decode, B in {1, 64, 128}: ours (functional and in place) and FLA ``fused_recurrent_simple_gla``; bandwidth
    counts the fp32 state read and written (q, k, v, o are < 1 % of the traffic);
  * with ``--sweep``: the prefill launch configurations and decode slice widths tried, to choose the defaults.
FLA is imported lazily; if it is not importable its entries say "not installed". Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import torch

from benchmarks.common import environment, measure_ceilings, time_ms, write_json

H, D = 64, 128
DEVICE = "cuda"


def _frac(nbytes: int, ms: Any, ceiling_tbps: float) -> float | None:
    """Achieved bandwidth as a fraction of the copy ceiling (None when ``ms`` is not a measurement)."""
    return nbytes / (ms * 1e-3) / 1e12 / ceiling_tbps if isinstance(ms, float) else None


def minimax_rates(heads: int = H, layer: int = 0, num_layers: int = 80) -> torch.Tensor:
    """s_{l,h} = 2^(-(h+1) 8/H) (1 - l/(L-1) + 1e-5) in fp32 (layer 0: 0.917 ... 0.0039)."""
    h = torch.arange(heads, dtype=torch.float32)
    return 2.0 ** (-(h + 1) * 8.0 / heads) * (1 - layer / (num_layers - 1) + 1e-5)


def _load_fla() -> tuple[Any, Any, str]:
    try:
        import fla  # noqa: F401
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        return None, None, f"not installed ({type(exc).__name__}: {exc})"
    import fla as fla_pkg

    return chunk_simple_gla, fused_recurrent_simple_gla, getattr(fla_pkg, "__version__", "unknown")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _timed(fn: Callable[[], Any], quick: bool) -> float:
    return time_ms(fn, warmup=3 if quick else 5, iters=10 if quick else 20)


def graph_ms(fn: Callable[[], Any], reps: int = 20) -> float | str:
    """GPU time per call with the host out of the loop: ``reps`` calls captured in one CUDA graph, replayed."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        return time_ms(graph.replay, warmup=2, iters=10) / reps
    except Exception as exc:  # noqa: BLE001 - a peer that cannot be captured is reported, not fatal
        return f"capture failed ({type(exc).__name__}: {str(exc)[:160]})"


def bench_prefill(T: int, fla_chunk: Any, copy_tbps: float, quick: bool, B: int = 1) -> dict[str, Any]:
    from kernels.lightning_attention.chunk import lightning_prefill_triton

    g = torch.Generator(device=DEVICE).manual_seed(T)
    q, k, v = (torch.nn.functional.silu(torch.randn(B, T, H, D, device=DEVICE, generator=g)).bfloat16() for _ in "qkv")
    s = minimax_rates().to(DEVICE)
    S0 = torch.randn(B, H, D, D, device=DEVICE, generator=g) * 0.01
    qkvo_bytes = 4 * B * T * H * D * q.element_size()
    state_bytes = 2 * B * H * D * D * 4
    ms = _timed(lambda: lightning_prefill_triton(q, k, v, s, S0), quick)
    row: dict[str, Any] = {
        "B": B,
        "T": T,
        "H": H,
        "D": D,
        "dtype": "bfloat16",
        "ours_ms": ms,
        "ours_tbps_qkvo": qkvo_bytes / (ms * 1e-3) / 1e12,
        "ours_frac_of_copy": qkvo_bytes / (ms * 1e-3) / 1e12 / copy_tbps,
        "qkvo_bytes": qkvo_bytes,
        "state_bytes": state_bytes,
    }
    if fla_chunk is None:
        row["fla_ms"] = "not installed"
        return row
    fla_call = lambda: fla_chunk(q, k, v, g_gamma=-s, scale=1.0, initial_state=S0, output_final_state=True)  # noqa: E731
    fla_ms = _timed(fla_call, quick)
    o, S = lightning_prefill_triton(q, k, v, s, S0)
    fo, fS = fla_call()
    row.update(
        fla_ms=fla_ms,
        fla_tbps_qkvo=qkvo_bytes / (fla_ms * 1e-3) / 1e12,
        speedup_vs_fla=fla_ms / ms,
        rel_diff_o_vs_fla=_rel(o, fo),
        rel_diff_state_vs_fla=_rel(S, fS),
    )
    return row


def bench_decode(B: int, fla_recurrent: Any, copy_tbps: float, quick: bool) -> dict[str, Any]:
    from kernels.lightning_attention.recurrent import lightning_decode_triton, lightning_decode_triton_

    g = torch.Generator(device=DEVICE).manual_seed(B)
    q, k, v = (torch.nn.functional.silu(torch.randn(B, 1, H, D, device=DEVICE, generator=g)).bfloat16() for _ in "qkv")
    s = minimax_rates().to(DEVICE)
    S0 = torch.randn(B, H, D, D, device=DEVICE, generator=g)
    state_bytes = 2 * B * H * D * D * 4  # read + write
    ours = lambda: lightning_decode_triton(q, k, v, s, S0)  # noqa: E731
    state = S0.clone()
    ours_inplace = lambda: lightning_decode_triton_(q, k, v, s, state)  # noqa: E731
    ms, ms_inplace = _timed(ours, quick), _timed(ours_inplace, quick)
    # eager times include the host (Python + launch, ~tens of us); graph times are the GPU's alone
    graph, graph_inplace = graph_ms(ours), graph_ms(ours_inplace)
    row: dict[str, Any] = {
        "B": B,
        "H": H,
        "D": D,
        "ours_ms": ms,
        "ours_inplace_ms": ms_inplace,
        "ours_graph_ms": graph,
        "ours_inplace_graph_ms": graph_inplace,
        "ours_frac_of_copy": _frac(state_bytes, ms, copy_tbps),
        "ours_graph_frac_of_copy": _frac(state_bytes, graph, copy_tbps),
        "ours_inplace_graph_frac_of_copy": _frac(state_bytes, graph_inplace, copy_tbps),
        "state_bytes": state_bytes,
    }
    if fla_recurrent is None:
        row["fla_ms"] = "not installed"
        return row
    fla_call = lambda: fla_recurrent(q, k, v, g_gamma=-s, scale=1.0, initial_state=S0, output_final_state=True)  # noqa: E731
    fla_ms = _timed(fla_call, quick)
    fla_graph = graph_ms(fla_call)
    o, S = lightning_decode_triton(q, k, v, s, S0)
    fo, fS = fla_call()
    row.update(
        fla_ms=fla_ms,
        fla_graph_ms=fla_graph,
        ours_over_fla_time=ms / fla_ms,
        ours_over_fla_graph_time=graph / fla_graph if isinstance(fla_graph, float) and isinstance(graph, float) else None,
        rel_diff_o_vs_fla=_rel(o, fo),
        rel_diff_state_vs_fla=_rel(S, fS),
    )
    return row


def sweep_prefill(T: int, copy_tbps: float) -> list[dict[str, Any]]:
    """Launch configurations of the prefill at B=1, H=64, D=128, bf16 (the defaults come from here)."""
    from kernels.lightning_attention.chunk import PrefillConfig, lightning_prefill_triton

    q, k, v = (torch.randn(1, T, H, D, device=DEVICE).bfloat16() for _ in "qkv")
    s = minimax_rates().to(DEVICE)
    S0 = torch.randn(1, H, D, D, device=DEVICE) * 0.01
    ref_o, _ = lightning_prefill_triton(q, k, v, s, S0, config=PrefillConfig(64, 64, 4, 2))
    qkvo_bytes = 4 * T * H * D * 2
    rows = []
    # the first sweep (benchmarks/results/lightning_2026-11-26_sweep.json) also tried 2 stages, 8 warps, 128 value
    # columns, 2-warp and 32/128-token blocks: all slower than (64, 64, 4, 3)
    for bt, bv, warps, stages in [
        (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4), (64, 64, 8, 4), (128, 64, 8, 3), (32, 64, 4, 4),
    ]:
        cfg = PrefillConfig(bt, bv, warps, stages)
        try:
            ms = time_ms(lambda: lightning_prefill_triton(q, k, v, s, S0, config=cfg), warmup=2, iters=10)
            o, _ = lightning_prefill_triton(q, k, v, s, S0, config=cfg)
            rows.append({**cfg.__dict__, "T": T, "ms": ms, "frac_of_copy": qkvo_bytes / (ms * 1e-3) / 1e12 / copy_tbps,
                         "rel_diff_vs_default": _rel(o, ref_o)})
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a sweep result, not a failure
            rows.append({**cfg.__dict__, "T": T, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        print("  sweep prefill", rows[-1], flush=True)
    return rows


def sweep_decode(B: int, copy_tbps: float) -> list[dict[str, Any]]:
    from kernels.lightning_attention.recurrent import _launch

    q, k, v = (torch.randn(B, 1, H, D, device=DEVICE).bfloat16() for _ in "qkv")
    s = minimax_rates().to(DEVICE)
    S0 = torch.randn(B, H, D, D, device=DEVICE)
    new = torch.empty_like(S0)
    state_bytes = 2 * B * H * D * D * 4
    rows = []
    for bv, warps in [(16, 1), (16, 2), (16, 4), (32, 1), (32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4)]:
        ms = graph_ms(lambda: _launch(q, k, v, s, S0, new, None, bv, warps))  # GPU time, host excluded
        rows.append({"B": B, "block_v": bv, "num_warps": warps, "graph_ms": ms,
                     "frac_of_copy": _frac(state_bytes, ms, copy_tbps)})
        print("  sweep decode", rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/lightning.json", help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="T=16K prefill and B in {1, 64} decode only, fewer iters")
    parser.add_argument("--sweep", action="store_true", help="also sweep prefill configs and decode slice widths")
    parser.add_argument("--lengths", type=int, nargs="+", help="prefill lengths (default 16K 32K 64K 128K)")
    parser.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default 1 64 128)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.lightning needs a CUDA GPU", file=sys.stderr)
        return 2

    env = environment()
    fla_chunk, fla_recurrent, fla_version = _load_fla()
    env["fla"] = fla_version
    print(f"device {env['device']}  torch {env['torch']}  triton {env['triton']}  fla {fla_version}", flush=True)
    ceilings = measure_ceilings()
    copy_tbps = ceilings["copy_tbps"]

    payload: dict[str, Any] = {
        "environment": env,
        "command": " ".join(["python -m benchmarks.lightning", *(argv if argv is not None else sys.argv[1:])]),
        "ceilings": ceilings,
    }
    if args.sweep:
        payload["sweep_prefill"] = [r for T in (16384, 65536) for r in sweep_prefill(T, copy_tbps)]
        payload["sweep_decode"] = [r for B in (1, 64) for r in sweep_decode(B, copy_tbps)]

    batches = args.batches or ((1, 64) if args.quick else (1, 64, 128))
    payload["decode"] = []
    for B in batches:
        payload["decode"].append(bench_decode(B, fla_recurrent, copy_tbps, args.quick))
        print("  decode", payload["decode"][-1], flush=True)
        torch.cuda.empty_cache()
    lengths = args.lengths or ((16384,) if args.quick else (16384, 32768, 65536, 131072))
    payload["prefill"] = []
    for T in lengths:
        payload["prefill"].append(bench_prefill(T, fla_chunk, copy_tbps, args.quick))
        print("  prefill", payload["prefill"][-1], flush=True)
        torch.cuda.empty_cache()

    print("\nprefill (B=1, H=64, D=128, bf16; bandwidth counts q, k, v, o once)")
    print(f"{'T':>7} {'ours ms':>9} {'TB/s':>6} {'% copy':>7} {'FLA ms':>9} {'FLA TB/s':>9} {'speedup':>8} {'rel diff':>9}")
    for r in payload["prefill"]:
        fla = r["fla_ms"]
        fla_cols = (
            f"{fla:9.3f} {r['fla_tbps_qkvo']:9.3f} {r['speedup_vs_fla']:7.2f}x {r['rel_diff_o_vs_fla']:9.2e}"
            if isinstance(fla, float) else f"{fla:>38}"
        )
        print(f"{r['T']:>7} {r['ours_ms']:9.3f} {r['ours_tbps_qkvo']:6.3f} {100 * r['ours_frac_of_copy']:6.1f}% {fla_cols}")
    print("\ndecode (H=64, D=128, bf16 q/k/v, fp32 state; bandwidth counts the state read + written)")
    print("  eager = host included; graph = 20 calls in one CUDA graph, per call")
    print(f"{'B':>5} {'ours eager':>10} {'ours graph':>10} {'in-place graph':>14} {'% copy':>7} "
          f"{'FLA eager':>10} {'FLA graph':>10}")

    def fmt(x: Any, width: int) -> str:
        return f"{x:{width}.4f}" if isinstance(x, float) else f"{str(x)[:width]:>{width}}"

    for r in payload["decode"]:
        print(f"{r['B']:>5} {fmt(r['ours_ms'], 10)} {fmt(r['ours_graph_ms'], 10)} {fmt(r['ours_inplace_graph_ms'], 14)} "
              f"{100 * (r['ours_graph_frac_of_copy'] or 0):6.1f}% {fmt(r['fla_ms'], 10)} {fmt(r.get('fla_graph_ms', ''), 10)}")
    write_json(args.out, payload)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
