"""ONNX lowering of a weightless skeleton against depth (issue 12): export + ``to_onnx`` of the prefill and decode
programs of a model on the meta device (no weight is ever allocated, read or written), with onnxscript's optimizer
off (its constant folding reads weights). Reports times, graph sizes, the bytes the initializers describe and the
process's peak RSS. Runs on the CPU.

    PYTHONPATH=. python -m benchmarks.onnx_depth --preset minimax-text-01 --layers 8,80 --out r.json

Each depth runs in a child process, so that every peak RSS is its own. The graphs are also written as an engine
folder holds them (``onnx_lowering.save_onnx_external``: initializers referencing the shared ``weights.onnx.data``
at their layout offsets), in a temporary folder; the data itself is what ``build.py --checkpoint --backend onnx``
converts a checkpoint into, which no machine here can hold at this size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.common import environment, write_json

CHILD = r"""
import json, resource, sys, tempfile, time, torch
from pathlib import Path
from benchmarks.build_depth import depth_config
from export import BuildSettings, export_programs
from export.onnx_lowering import save_onnx_external, to_onnx, weights_layout
out = Path(tempfile.mkdtemp(prefix="onnx-depth-"))
from model import MiniMaxForCausalLM
layers, preset = int(sys.argv[1]), sys.argv[2]
with torch.device("meta"):
    model = MiniMaxForCausalLM(depth_config(preset, layers), dtype=torch.bfloat16)
model.eval()
settings = BuildSettings(backend="onnx", device="cpu", dtype="bfloat16", max_batch=2, max_input_len=64,
                         max_seq_len=256, page_size=64)
row = {"layers": layers, "preset": preset}
t0 = time.perf_counter()
with torch.no_grad():
    programs = export_programs(model, settings)
row["export_s"] = time.perf_counter() - t0
for name, ep in programs.items():
    t0 = time.perf_counter()
    graph, _ = to_onnx(ep, name, settings, optimize=False)
    row[f"onnx_{name}_s"] = time.perf_counter() - t0
    row[f"onnx_{name}_nodes"] = len(list(graph.graph))
    row[f"onnx_{name}_initializers"] = len(graph.graph.initializers)
    row[f"onnx_{name}_initializer_bytes"] = sum(v.const_value.nbytes for v in graph.graph.initializers.values())
    # the graph as an engine folder holds it: initializers referencing the shared external data (layout only)
    t0 = time.perf_counter()
    layout = weights_layout(graph)
    save_onnx_external(graph, out / f"{name}.onnx", layout)
    row[f"onnx_{name}_save_s"] = time.perf_counter() - t0
    row[f"onnx_{name}_graph_file_bytes"] = (out / f"{name}.onnx").stat().st_size
    row["external_data_bytes"] = max(e["offset"] + e["nbytes"] for e in layout.values())
    del graph
row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print("RESULT " + json.dumps(row))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="minimax-text-01")
    p.add_argument("--layers", default="8,80", help="comma-separated depths (default 8,80)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    rows = []
    for layers in (int(x) for x in args.layers.split(",")):
        r = subprocess.run([sys.executable, "-c", CHILD, str(layers), args.preset], capture_output=True, text=True,
                           check=False)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(line[-1][7:]))
        print(json.dumps(rows[-1]), flush=True)
    write_json(args.out, {"environment": environment(), "rows": rows,
                          "command": "PYTHONPATH=. python -m benchmarks.onnx_depth " + " ".join(argv or sys.argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
