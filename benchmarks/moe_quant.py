"""Quantized experts on the GPU (issue 15): the int8 (W8A16) and fp8 (W8A8) MoE against our bf16 MoE, the bytes
they must read and the dense GEMM ceilings, in one process; then a 2-layer real-width model decoding with int8 experts against its own
floor, and the accuracy of int8 against bf16 logits on a 4-layer real-width slice.

    LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6 PYTHONPATH=. python -m benchmarks.moe_quant --out r.json
    PYTHONPATH=. python -m benchmarks.moe_quant --smoke --out r.json     # CPU: tiny sizes under the interpreter

Op level (hidden 6144, 32 experts of I = 9216, top-2, bf16 activations, router fp32; weights N(0, 0.02)):
  * decode, T = 1, 2, 4, 8, 16: ours int8, fp8 and bf16 replayed from a CUDA graph; the floor is the bytes of the
    experts the tokens select (distinct experts x 3 x I x hidden x 1 byte, plus their fp32 scales) over the copy
    bandwidth measured in the same run (the convention of ``benchmarks/moe.py``); target <= 1.2x that floor;
  * prefill, T = 16384: int8 and fp8 against our bf16 MoE (targets: int8 no slower than 1.1x, fp8 >= 1.4x faster);
    eager launches (the pointer kernels for the quantized modes, bf16 with its default TMA kernels);
  * fp8 twice: with fp32 accumulation of the fp8 products (the default, promoted every K tile) and with Hopper's
    fast accumulation (``fp8_fast_accum``, Triton's own default on sm_90), each against the reference;
  * ceilings: copy bandwidth, a bf16 8192^3 matmul and an fp8 e4m3 one (``torch._scaled_mm``, per-tensor scales).
Model level (``--model-layers``, default 2): minimax-text-01 cut to that many real-width layers, random bf16
weights, experts quantized to int8, AOTInductor prefill/decode compiled here (``benchmarks.decode``); decode at B = 1
(ms/token, 32 steps after a 64-token prompt) against the floor of the bytes read per token (attention, router, norms,
embedding row and fp32 LM head as in ``benchmarks.decode.weight_bytes_per_token``, with the top-2 experts' int8
bytes and scales in place of their bf16 bytes); target <= 1.15x; the bf16 engine on the same weights as the peer.
Accuracy (``--accuracy-layers``, default 4): a real-width slice with random weights, eager on the GPU, bf16 experts
against int8 experts on the same prompt: a prefill of ``--accuracy-tokens`` (default 256) and 64 greedy steps of
the bf16 model fed to both; KL(bf16 || int8) and top-1 agreement of the logits over all those positions, and the same
against a control: the bf16 experts perturbed by Gaussian noise of the int8 rounding error's RMS (a random model's
sensitivity to any perturbation of that size, not int8's own error).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from benchmarks.common import environment, write_json  # noqa: E402


def fp8_matmul_tflops(n: int = 8192) -> float | str:
    """Dense e4m3 n^3 matmul through ``torch._scaled_mm`` (per-tensor scales, bf16 output), TFLOP/s."""
    from benchmarks.common import time_ms

    try:
        a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # column-major second operand
        one = torch.ones((), device="cuda")
        ms = time_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        return 2 * n**3 / (ms * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is a result
        return f"failed ({type(e).__name__}: {str(e)[:120]})"


def _timer(cuda: bool):
    if cuda:
        from benchmarks.common import time_ms

        return lambda fn: time_ms(fn, warmup=3, iters=10)
    from benchmarks.decode import host_ms

    return lambda fn: host_ms(fn, warmup=1, iters=3)


def _graph_or_plain(fn, cuda: bool) -> float | str:
    if not cuda:
        return _timer(False)(fn)
    from benchmarks.moe import _graph_ms

    try:
        return _graph_ms(fn, reps=10)
    except Exception as e:  # noqa: BLE001
        return f"capture failed ({type(e).__name__}: {str(e)[:120]})"


@torch.no_grad()
def op_level(dims: tuple[int, int, int, int], tokens: list[int], prefill_tokens: list[int], copy_tbps: float | None,
             device: str) -> list[dict[str, Any]]:
    import dataclasses

    from kernels.moe import naive
    from kernels.moe.dispatch import default_config, moe_forward_triton

    hidden, inter, E, top_k = dims
    cuda = device == "cuda"
    act = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    w1, w3 = (torch.empty(E, inter, hidden, device=device, dtype=act).normal_(0, 0.02, generator=g) for _ in range(2))
    w2 = torch.empty(E, hidden, inter, device=device, dtype=act).normal_(0, 0.02, generator=g)
    router = torch.randn(E, hidden, device=device, generator=g) * 0.02
    (q1, s1), (q3, s3), (q2, s2) = (naive.quantize_weight(w, "experts-int8") for w in (w1, w3, w2))
    (f1, t1), (f3, t3), (f2, t2) = (naive.quantize_weight(w, "experts-fp8") for w in (w1, w3, w2))
    rows = []
    timer = _timer(cuda)
    for T in tokens + prefill_tokens:
        x = torch.randn(T, hidden, device=device, generator=g).to(act)
        int8 = lambda: moe_forward_triton(x, router, q1, q3, q2, top_k, scales=(s1, s3, s2))  # noqa: E731
        fp8 = lambda: moe_forward_triton(x, router, f1, f3, f2, top_k, scales=(t1, t3, t2),  # noqa: E731
                                         mode="experts-fp8")
        fast_cfg = dataclasses.replace(default_config(T, top_k, E, torch.device(device), "experts-fp8"),
                                       fp8_fast_accum=True)
        fp8_fast = lambda: moe_forward_triton(x, router, f1, f3, f2, top_k, scales=(t1, t3, t2),  # noqa: E731
                                              mode="experts-fp8", config=fast_cfg)
        bf16 = lambda: moe_forward_triton(x, router, w1, w3, w2, top_k)  # noqa: E731
        row: dict[str, Any] = {"T": T}
        if T <= 16:
            for label, fn, qs, mode in (("int8", int8, (q1, s1, q3, s3, q2, s2), "experts-int8"),
                                        ("fp8", fp8, (f1, t1, f3, t3, f2, t2), "experts-fp8"),
                                        ("fp8_fast", fp8_fast, (f1, t1, f3, t3, f2, t2), "experts-fp8")):
                ref = naive.moe_forward_quantized(x, router, *qs, top_k, mode).float()
                row[f"{label}_rel_vs_quantized_reference"] = float((fn().float() - ref).norm() / ref.norm())
        if T in tokens:  # decode: graph replay, against the bytes of the selected experts
            row["int8_ms"], row["fp8_ms"] = _graph_or_plain(int8, cuda), _graph_or_plain(fp8, cuda)
            row["fp8_fast_ms"], row["bf16_ms"] = _graph_or_plain(fp8_fast, cuda), _graph_or_plain(bf16, cuda)
            ids = naive.moe_route(x, router, top_k)[1]
            n_sel = int(torch.unique(ids).numel())
            sel_bytes = n_sel * (3 * inter * hidden * 1 + (2 * inter + hidden) * 4)
            row.update(distinct_experts=n_sel, selected_int8_bytes=sel_bytes)
            if copy_tbps:
                row["read_selected_int8_ms"] = sel_bytes / (copy_tbps * 1e12) * 1e3
                for label in ("int8", "fp8", "fp8_fast"):
                    if isinstance(row[f"{label}_ms"], float):
                        row[f"{label}_over_read"] = row[f"{label}_ms"] / row["read_selected_int8_ms"]
        else:  # prefill: eager launches
            row["int8_ms"], row["fp8_ms"], row["bf16_ms"] = timer(int8), timer(fp8), timer(bf16)
            row["fp8_fast_ms"] = timer(fp8_fast)
            row["int8_over_bf16"] = row["int8_ms"] / row["bf16_ms"]
            row["fp8_speedup_vs_bf16"] = row["bf16_ms"] / row["fp8_ms"]
            row["fp8_fast_speedup_vs_bf16"] = row["bf16_ms"] / row["fp8_fast_ms"]
            row["flops"] = 6 * T * top_k * hidden * inter
            for label in ("int8", "fp8", "fp8_fast", "bf16"):
                row[f"{label}_tflops"] = row["flops"] / (row[f"{label}_ms"] * 1e-3) / 1e12
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


DECODE_CANDIDATES = [  # (block_n, block_k, num_warps, num_stages, split-K): the 12-04 sweep's best, then split-K
    (32, 128, 4, 3, 1), (32, 256, 4, 4, 1), (16, 256, 2, 6, 1), (32, 128, 2, 4, 1), (16, 128, 2, 6, 1),
    (64, 256, 4, 3, 1), (64, 128, 4, 3, 1),
    *[(bn, bk, w, st, sp) for sp in (2, 4) for bn, bk, w, st in
      ((32, 128, 4, 3), (32, 256, 4, 4), (16, 256, 2, 6), (64, 128, 4, 3), (64, 256, 4, 3))],
]
SWEEP_MODES = ("bf16", "experts-int8", "experts-fp8")


@torch.no_grad()
def sweep_decode(dims: tuple[int, int, int, int], tokens: list[int]) -> list[dict[str, Any]]:
    """The decode kernels' tiles and split-K for bf16, int8 and fp8 weights, each stage alone from a CUDA graph."""
    from benchmarks.moe import _graph_ms
    from kernels.moe import grouped, naive, routing

    hidden, inter, E, top_k = dims
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.empty(E, inter, hidden, device="cuda", dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
          for _ in range(2)] + [torch.empty(E, hidden, inter, device="cuda", dtype=torch.bfloat16).normal_(0, 0.02,
                                                                                                          generator=g)]
    router = torch.randn(E, hidden, device="cuda", generator=g) * 0.02
    rows = []
    for mode in SWEEP_MODES:
        if mode == "bf16":
            (q1, s1), (q3, s3), (q2, s2) = ((w, None) for w in ws)
        else:
            (q1, s1), (q3, s3), (q2, s2) = (naive.quantize_weight(w, mode) for w in ws)
        for T in tokens:
            x = torch.randn(T, hidden, device="cuda", generator=g).bfloat16()
            w, ids = routing.moe_route_triton(x, router, top_k)
            a, a_scale = (x, None) if mode != "experts-fp8" else grouped.quantize_rows_fp8(x)
            for bn, bk, warps, stages, split in DECODE_CANDIDATES:
                kw = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, split=split)
                row: dict[str, Any] = {"mode": mode, "T": T, **kw}
                try:
                    h = torch.empty(T * top_k, inter, device="cuda", dtype=x.dtype)
                    scales = None if s1 is None else (s1, s3)
                    swiglu = lambda: grouped.swiglu_decode(a, q1, q3, ids, out=h, scales=scales,  # noqa: E731
                                                           row_scale=a_scale, **kw)
                    row["swiglu_ms"] = _graph_ms(swiglu)
                    swiglu()
                    hq, h_scale = (h, None) if mode != "experts-fp8" else grouped.quantize_rows_fp8(h)
                    row["down_ms"] = _graph_ms(lambda: grouped.down_combine_decode(
                        hq, q2, w, ids, out_dtype=x.dtype, scale=s2, row_scale=h_scale, **kw))
                except Exception as exc:  # noqa: BLE001 - a tile set that does not compile is a result
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                print("  sweep decode", row, flush=True)
        del q1, q3, q2
        torch.cuda.empty_cache()
    return rows


def choose_decode_tiles(rows: list[dict[str, Any]]) -> dict[str | None, dict[str, int]]:
    """Per mode and stage, the candidate whose times over the swept T, each relative to that T's best, sum least
    (one decode class serves T = 1..16): the ``dispatch._DECODE_TILES`` entries the sweep recommends."""
    out: dict[str | None, dict[str, int]] = {}
    for mode in SWEEP_MODES:
        tiles: dict[str, int] = {}
        for stage, prefix in (("swiglu_ms", "decode_"), ("down_ms", "decode_down_")):
            ok = [r for r in rows if r["mode"] == mode and stage in r]
            best = {T: min(r[stage] for r in ok if r["T"] == T) for T in {r["T"] for r in ok}}
            key = lambda r: (r["block_n"], r["block_k"], r["num_warps"], r["num_stages"], r["split"])  # noqa: E731
            score: dict[tuple, float] = {}
            for r in ok:
                score[key(r)] = score.get(key(r), 0.0) + r[stage] / best[r["T"]]
            full = [k for k in score if sum(key(r) == k for r in ok) == len(best)]  # measured at every T
            bn, bk, warps, stages, split = min(full, key=score.__getitem__)
            tiles.update({f"{prefix}block_n": bn, f"{prefix}block_k": bk, f"{prefix}warps": warps,
                          f"{prefix}stages": stages, f"{prefix}split": split})
        out[None if mode == "bf16" else mode] = tiles
    return out


def _int8_floor_bytes(config) -> dict[str, int]:
    from benchmarks.decode import weight_bytes_per_token

    parts = weight_bytes_per_token(config, torch.bfloat16)
    per_layer = config.num_experts_per_tok * (3 * config.hidden_size * config.intermediate_size
                                              + (2 * config.intermediate_size + config.hidden_size) * 4)
    parts = dict(parts)
    parts["total"] -= parts["experts_top_k"]
    parts["experts_top_k"] = per_layer * config.num_hidden_layers
    parts["total"] += parts["experts_top_k"]
    return parts


@torch.no_grad()
def model_level(layers: int, copy_tbps: float) -> dict[str, Any]:
    from benchmarks.decode import build_aoti_engine, random_model, reduced_config, weight_bytes_per_token

    config = reduced_config("minimax-text-01", layers)
    bf16 = random_model(config, torch.bfloat16, "cuda")
    out: dict[str, Any] = {"layers": layers}
    V = config.vocab_size
    prompt = torch.randint(0, V, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    for label, model in (("bf16", bf16), ("int8", None)):
        if model is None:
            model = bf16.quantize_experts_("experts-int8")  # in place: the bf16 experts are freed layer by layer
        with tempfile.TemporaryDirectory() as tmp:
            engine, timings = build_aoti_engine(model, 1, 64, 256, Path(tmp), page_size=64)
        floor = (_int8_floor_bytes(config) if label == "int8" else weight_bytes_per_token(config, torch.bfloat16))
        from benchmarks.common import time_ms

        engine.reset(1)
        engine.prefill(prompt, torch.zeros(1, dtype=torch.long, device="cuda"))
        tok = prompt[:, -1:]
        held = [64]
        pos = torch.full((1,), 64, dtype=torch.long, device="cuda")

        def step():  # each step continues the row (the runtime refuses a position it already holds)
            engine.decode(tok, pos, held)
            pos.add_(1)
            held[0] += 1

        ms = time_ms(step, warmup=3, iters=32)  # 64..99 held: the time of a step at ~64-100 positions
        floor_ms = floor["total"] / (copy_tbps * 1e12) * 1e3
        out[label] = {"decode_ms": ms, "floor_bytes": floor, "floor_ms": floor_ms, "ratio_to_floor": ms / floor_ms,
                      "build_s": timings}
        print(f"  {label}: decode {ms:.3f} ms/token, floor {floor_ms:.3f} ms ({ms / floor_ms:.2f}x)", flush=True)
        del engine
        torch.cuda.empty_cache()
    del bf16
    torch.cuda.empty_cache()
    return out


@torch.no_grad()
def accuracy(layers: int, tokens: int, device: str, preset: str = "minimax-text-01", steps: int = 64,
             cpu_hidden: int = 0) -> dict[str, Any]:
    from benchmarks.decode import random_model, reduced_config
    from tests.utils import logit_report

    if device == "cuda":
        config = reduced_config(preset, layers)
        model = random_model(config, torch.bfloat16, device)
    elif cpu_hidden:  # fp32 on the CPU: minimax-text-01's first 4 layers at hidden cpu_hidden, 8 experts of 2048
        import dataclasses

        from model import MiniMaxConfig, MiniMaxForCausalLM

        base = MiniMaxConfig.preset(preset)
        config = dataclasses.replace(base, num_hidden_layers=4, layer_types=base.layer_types[:4],
                                     hidden_size=cpu_hidden, intermediate_size=2048, num_local_experts=8,
                                     vocab_size=32000, eos_token_id=None)
        model = MiniMaxForCausalLM(config).init_random_weights(seed=1, std=0.02).eval()
    else:
        from model import MiniMaxConfig, MiniMaxForCausalLM

        config = MiniMaxConfig.preset("tiny")
        model = MiniMaxForCausalLM(config).init_random_weights(seed=1, std=0.1).eval()
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(2)).to(device)

    def run(m, fed: list[int] | None):
        state = m.new_state(1, tokens + steps + 1, page_size=64)
        logits, state = m.prefill(ids, state)
        out, chosen = [logits[0].float().cpu()], []
        tok = int(logits[0, -1].argmax()) if fed is None else fed[0]
        for i in range(steps):
            chosen.append(tok)
            logits, state = m.decode(torch.tensor([[tok]], device=device), torch.tensor([tokens + i], device=device),
                                     state)
            out.append(logits[0].float().cpu())
            tok = int(logits[0, -1].argmax()) if fed is None else fed[min(i + 1, len(fed) - 1)]
        return torch.cat(out), chosen

    ref, chosen = run(model, None)  # the bf16 model's greedy continuation, fed to both
    from model import MiniMaxForCausalLM
    from model.modeling import QuantizedExperts

    bf16_report = None
    if device == "cpu" and cpu_hidden:  # a second control on the fp32 slice: every weight rounded to bf16
        bf16 = MiniMaxForCausalLM(config, dtype=torch.bfloat16)
        for (name, p), (name_ref, p_ref) in zip(bf16.named_parameters(), model.named_parameters(), strict=True):
            assert name == name_ref
            p.data.copy_(p_ref)
        bf16_report = logit_report(run(bf16.eval(), chosen)[0], ref)
        del bf16

    # int8 experts, made now from the unperturbed weights, swapped in after the control below
    moes = [layer.block_sparse_moe for layer in model.model.layers]
    quantized = [QuantizedExperts.from_experts(moe.experts, config, "experts-int8") for moe in moes]
    # Control: the same model with every expert weight perturbed by Gaussian noise of the int8 rounding error's RMS
    # (scale / sqrt(12) per output channel). Random-weight models at real width amplify any perturbation (bf16
    # against fp32 gave KL 1.4e-3 on a hidden-6144 CPU slice); the control says how much of int8's figure is that.
    g = torch.Generator(device=device).manual_seed(3)
    for moe, q in zip(moes, quantized):
        for name in ("w1", "w3", "w2"):
            w, scale = getattr(moe.experts, name), getattr(q, f"{name}_scale")
            noise = torch.empty(w.shape, device=device, dtype=torch.float32).normal_(generator=g)
            w.add_((noise * (scale.unsqueeze(-1) / 12**0.5)).to(w.dtype))
            del noise
    control, _ = run(model, chosen)
    for moe, q in zip(moes, quantized):
        moe.experts = q
    got, _ = run(model, chosen)
    report = logit_report(got, ref)
    result = {"layers": layers if device == "cuda" else f"4 at hidden {cpu_hidden}" if cpu_hidden else "tiny",
              "positions": tokens + steps, **report,
              "control_equal_rms_noise": logit_report(control, ref)}
    if bf16_report is not None:
        result["control_bf16_weights"] = bf16_report
    print(f"accuracy int8 vs {'bf16' if device == 'cuda' else 'fp32'}: {result}", flush=True)
    return result


def _decode_tiles() -> dict:
    from kernels.moe import dispatch

    return dict(dispatch._DECODE_TILES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.moe_quant", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny sizes under the interpreter")
    p.add_argument("--model-layers", type=int, default=2, help="layers of the decode slice (0: skip)")
    p.add_argument("--accuracy-layers", type=int, default=4, help="layers of the accuracy slice (0: skip)")
    p.add_argument("--accuracy-tokens", type=int, default=256)
    p.add_argument("--sweep", action="store_true", help="also sweep the decode tiles with 1-byte weights (T = 1, 16)")
    p.add_argument("--apply-sweep", action="store_true",
                   help="with --sweep: run the op-level timings with the decode tiles the sweep chose")
    p.add_argument("--skip-op", action="store_true", help="skip the op-level timings (GPU)")
    p.add_argument("--cpu-hidden", type=int, default=0,
                   help="with --smoke: the accuracy part only, on a 4-layer fp32 slice of this width (8 experts of "
                        "2048; e.g. 6144, ~6 GB, a few minutes)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("benchmarks.moe_quant: needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    payload: dict[str, Any] = {"environment": environment(), "command": "python -m benchmarks.moe_quant "
                               + " ".join(argv if argv is not None else sys.argv[1:])}
    t0 = time.perf_counter()
    if cuda:
        from benchmarks.common import measure_ceilings

        payload["ceilings"] = measure_ceilings()
        payload["ceilings"]["matmul_fp8_tflops"] = fp8_matmul_tflops()
        print(f"fp8 matmul: {payload['ceilings']['matmul_fp8_tflops']}", flush=True)
        copy_tbps = payload["ceilings"]["copy_tbps"]
        if args.sweep:
            payload["sweep_decode"] = sweep_decode((6144, 9216, 32, 2), [1, 16])
            chosen = choose_decode_tiles(payload["sweep_decode"])
            payload["sweep_choice"] = {str(k): v for k, v in chosen.items()}
            print(f"sweep choice: {payload['sweep_choice']}", flush=True)
            if args.apply_sweep:  # the op-level timings below run with the sweep's choice
                from kernels.moe import dispatch

                for mode, tiles in chosen.items():
                    dispatch._DECODE_TILES[mode] = dict(dispatch._DECODE_TILES[mode], **tiles)
        payload["decode_tiles"] = {str(k): v for k, v in _decode_tiles().items()}
        if not args.skip_op:
            payload["op"] = op_level((6144, 9216, 32, 2), [1, 2, 4, 8, 16], [16384], copy_tbps, "cuda")
        if args.model_layers:
            payload["model"] = model_level(args.model_layers, copy_tbps)
        if args.accuracy_layers:
            payload["accuracy"] = accuracy(args.accuracy_layers, args.accuracy_tokens, "cuda")
    elif args.cpu_hidden:
        payload["accuracy"] = accuracy(0, 96, "cpu", steps=16, cpu_hidden=args.cpu_hidden)
    else:
        payload["op"] = op_level((64, 96, 8, 2), [1, 4], [40], None, "cpu")
        payload["accuracy"] = accuracy(0, 24, "cpu", steps=4)
    payload["wall_s"] = time.perf_counter() - t0
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
