"""AOTInductor build time against depth (issue 12): export and compile of the prefill and decode programs at 2, 8
and 80 layers, from an uninitialised skeleton (no weights are read or packaged).

Depth changes the size of the traced graph and of the generated wrapper, not the kernels' shapes, so the widths are
a parameter (``--preset``: ``tiny`` by default, which fits the 2-core CPU machine; ``minimax-text-01`` on a machine
that can allocate the skeleton). Layers follow the real plan: 7 lightning + 1 softmax per 8 (2 layers: one of each).

    PYTHONPATH=. python -m benchmarks.build_depth --layers 2,8,80 --device cpu --out r.json
    PYTHONPATH=. python -m benchmarks.build_depth --layers 2,8,80 --layer-programs --out r.json   # per-kind programs

``--layer-programs``: the per-kind layer programs of ``build.py --layer-programs`` (``export/layered.py``: one
program per layer kind and step, the layers' weights as inputs) instead of the whole prefill / decode programs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import environment, write_json


def depth_config(preset: str, layers: int):
    from model import MiniMaxConfig
    from model.config import LIGHTNING, SOFTMAX

    base = MiniMaxConfig.preset(preset)
    kinds = [LIGHTNING, SOFTMAX] if layers == 2 else [SOFTMAX if (i + 1) % 8 == 0 else LIGHTNING for i in range(layers)]
    return dataclasses.replace(base, num_hidden_layers=layers, layer_types=tuple(kinds))


@torch.no_grad()
def build_times(preset: str, layers: int, device: str, workdir: Path, layer_programs: bool = False) -> dict:
    from export import BuildSettings, export_programs
    from export.layered import export_layer_programs
    from model import MiniMaxForCausalLM

    config = depth_config(preset, layers)
    with torch.device("meta"):
        model = MiniMaxForCausalLM(config, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    model = model.to_empty(device=device)
    model.model.reset_buffers()
    model.eval()
    settings = BuildSettings(device=device, dtype="float32" if device == "cpu" else "bfloat16", max_batch=2,
                             max_input_len=64, max_seq_len=256, page_size=64)
    row = {"layers": layers, "preset": preset, "device": device, "layer_programs": layer_programs}
    t0 = time.perf_counter()
    programs = export_layer_programs(model, settings) if layer_programs else export_programs(model, settings)
    row["export_s"] = time.perf_counter() - t0
    for name, ep in programs.items():
        t0 = time.perf_counter()
        torch._inductor.aoti_compile_and_package(ep, package_path=str(workdir / f"{layers}-{name}.pt2"),
                                                 inductor_configs={"aot_inductor.package_constants_in_so": False})
        row[f"compile_{name}_s"] = time.perf_counter() - t0
    for step in ("prefill", "decode"):  # layer programs: the step's parts together
        row.setdefault(f"compile_{step}_s", sum(v for k, v in row.items() if k.startswith(f"compile_{step}.")))
    print(f"  {layers:>3} layers{' (layer programs)' if layer_programs else ''}: export {row['export_s']:.1f}s, "
          f"compile prefill {row['compile_prefill_s']:.1f}s, decode {row['compile_decode_s']:.1f}s", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[2, 8, 80])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--layer-programs", action="store_true", help="per-kind layer programs (build.py --layer-programs)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            rows.append(build_times(args.preset, layers, args.device, Path(tmp), args.layer_programs))
            write_json(args.out, {"environment": environment(), "rows": rows,
                                  "command": "python -m benchmarks.build_depth " + " ".join(argv or sys.argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
