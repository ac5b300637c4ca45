"""Peak host memory of the checkpoint converter (issue 12): a generated checkpoint larger than the memory budget,
converted into an engine folder's weights in a child process whose peak RSS is measured.

The checkpoint (official key names, transformers config schema, fp32, ``--shard-mb`` shards) is written tensor by
tensor from the converter's own key plan, so generating it holds one tensor at a time too. The child runs
``model.loading.convert_checkpoint`` into an ``export.weights.ShardWriter`` (bf16, ``--out-shard-mb`` shards);
its peak RSS is ``ru_maxrss`` of the child (``resource.getrusage(RUSAGE_CHILDREN)``). Runs on the CPU.

    PYTHONPATH=. python -m benchmarks.convert --gb 4.5 --out r.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import environment, write_json

CHILD = r"""
import sys, time, json, torch
from export.weights import ShardWriter
from model.loading import convert_checkpoint
start = time.perf_counter()
writer = ShardWriter(sys.argv[2], shard_bytes=int(sys.argv[3]) << 20)
convert_checkpoint(sys.argv[1], writer, torch.bfloat16)
entry = writer.close()
print(json.dumps({"convert_s": time.perf_counter() - start, "shards": len(entry["shards"]),
                  "bytes_written": writer.bytes_written}))
"""


def write_checkpoint(path: Path, gb: float, shard_mb: int) -> dict:
    """A random fp32 checkpoint of about ``gb`` GB: the tiny test layout widened (hidden 1024, 16 experts x 2048)."""
    from safetensors.torch import save_file
    from transformers import MiniMaxConfig as HFConfig

    from model import MiniMaxConfig, MiniMaxForCausalLM
    from model.loading import checkpoint_key_plan

    per_layer = 3 * 16 * 2048 * 1024 * 4 + 4 * 1024 * 1024 * 4  # experts + attention, fp32
    layers = max(4, round(gb * 1e9 / per_layer / 4) * 4)
    kinds = (["linear_attention"] * 3 + ["full_attention"]) * (layers // 4)
    hf = HFConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_local_experts=16,
                  num_experts_per_tok=2, block_size=256, layer_types=kinds,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=4096)
    path.mkdir(parents=True)
    hf.save_pretrained(path)
    config = MiniMaxConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = MiniMaxForCausalLM(config, dtype=torch.float32)
    plan = checkpoint_key_plan(skeleton)
    shard, shard_bytes, n, weight_map, total = {}, 0, 0, {}, 0
    gen = torch.Generator().manual_seed(0)

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(path / name))
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for key, target in plan.items():
        t = torch.randn(target.shape, generator=gen) * 0.02
        shard[key] = t
        shard_bytes += t.numel() * 4
        total += t.numel() * 4
        if shard_bytes >= shard_mb << 20:
            flush()
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return {"layers": layers, "bytes": total, "shards": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=4.5, help="checkpoint size in GB (fp32; default 4.5)")
    p.add_argument("--shard-mb", type=int, default=256, help="checkpoint shard size (default 256 MB)")
    p.add_argument("--out-shard-mb", type=int, default=512, help="engine weight shard size (default 512 MB)")
    p.add_argument("--workdir", default=None, help="where to write (default: a temporary folder, removed after)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        t0 = time.perf_counter()
        ckpt = write_checkpoint(root / "ckpt", args.gb, args.shard_mb)
        ckpt["write_s"] = time.perf_counter() - t0
        print(f"checkpoint: {ckpt['bytes'] / 1e9:.2f} GB in {ckpt['shards']} shards, {ckpt['layers']} layers "
              f"({ckpt['write_s']:.1f}s)", flush=True)
        r = subprocess.run([sys.executable, "-c", CHILD, str(root / "ckpt"), str(root / "engine"),
                            str(args.out_shard_mb)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        child = json.loads(r.stdout.strip().splitlines()[-1])
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        result = {"environment": environment(), "checkpoint": ckpt, "convert": child, "peak_rss_bytes": peak_rss,
                  "command": "PYTHONPATH=. python -m benchmarks.convert " + " ".join(argv or sys.argv[1:])}
        print(f"converted in {child['convert_s']:.1f}s into {child['shards']} shards "
              f"({child['bytes_written'] / 1e9:.2f} GB bf16); converter peak RSS {peak_rss / 2**30:.2f} GiB", flush=True)
        write_json(args.out, result)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
