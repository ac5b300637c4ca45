"""A real-width slice end to end at its real size (issue 12): checkpoint on disk -> converted and built -> loaded.

    PYTHONPATH=. python -m benchmarks.real_scale --workdir /tmp/rs --out r.json     # GPU machine, ~6 min

1. Writes a random ``minimax-text-01`` checkpoint cut to ``--layers`` real-width layers (default 2: one lightning,
   one softmax; bf16, official key names from the converter's key plan, 2 GB shards). Each shard is fsync'ed and
   dropped from the page cache (``posix_fadvise(DONTNEED)``), so later reads come from the disk.
2. Measures the disk's sequential read bandwidth (``O_DIRECT`` reads of the first shard) and the pinned
   host-to-device copy bandwidth.
3. Runs ``build.py --checkpoint ... --backend aoti --device cuda`` (conversion streamed shard by shard, export on a
   skeleton, AOTInductor CUDA packages without their weights) in a child process: time and peak RSS. The folder's
   weight shards are then dropped from the page cache too.
4. In a fresh child process: ``runtime.Engine.load`` (weights hashed and copied as read), its time and throughput
   against the slower of the two bandwidths; then eager parity: the eager model with the same weights,
   prefill of a 300-token prompt (two chunks) and 16 greedy decode steps through both (the eager model fed the
   engine's tokens), max |logit difference|, KL and top-1 agreement per step.

Needs about 2.1x the checkpoint's size of free disk (checkpoint + folder, at the end of the conversion); the
checkpoint is removed after the build, and the eager model of the parity check is filled from the folder's weights
(the converter's correctness against transformers is CI's ``tests/test_convert.py``). Prints each phase, writes
JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import environment, write_json

SHARD_BYTES = 2 << 30


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_checkpoint(path: Path, layers: int) -> dict:
    from safetensors.torch import save_file

    from model import MiniMaxConfig, MiniMaxForCausalLM
    from model.config import LIGHTNING, SOFTMAX
    from model.loading import checkpoint_key_plan

    kinds = tuple(([LIGHTNING] * 7 + [SOFTMAX]) * 10)[:layers] if layers > 2 else (LIGHTNING, SOFTMAX)[:layers]
    config = dataclasses.replace(MiniMaxConfig.preset("minimax-text-01"), num_hidden_layers=layers, layer_types=kinds)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    with torch.device("meta"):
        skeleton = MiniMaxForCausalLM(config, dtype=torch.bfloat16)
    plan = checkpoint_key_plan(skeleton)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    size, n, weight_map, total = 0, 0, {}, 0
    start = time.perf_counter()

    def flush() -> None:
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(path / name))
            _drop_cache(path / name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for key, target in plan.items():
        t = (torch.randn(target.shape, generator=gen, device="cuda", dtype=torch.float32) * 0.02)
        shard[key] = t.to(torch.bfloat16).cpu()
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return {"layers": layers, "layer_types": list(kinds), "bytes": total, "shards": n,
            "write_s": time.perf_counter() - start}


def disk_read_gbps(path: Path, limit: int = 4 << 30) -> float:
    """Sequential O_DIRECT read of ``path`` (up to ``limit`` bytes) in 64 MB blocks, bypassing the page cache."""
    import mmap

    block = 64 << 20
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    total, start = 0, time.perf_counter()
    try:
        while total < limit:
            n = os.readv(fd, [buf])
            if n <= 0:
                break
            total += n
            if n < block:
                break
    finally:
        os.close(fd)
    return total / (time.perf_counter() - start) / 1e9


def h2d_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * nbytes / (time.perf_counter() - start) / 1e9


CHILD = r"""
import json, sys, time, logging, torch
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from runtime import Engine
from model import MiniMaxForCausalLM
engine_dir, ckpt = sys.argv[1], sys.argv[2]
cuda = torch.cuda.is_available()
t0 = time.perf_counter()
engine = Engine.load(engine_dir)
if cuda:
    torch.cuda.synchronize()
load_s = time.perf_counter() - t0
res = {"load_s": load_s, "gpu_gb_after_load": torch.cuda.memory_allocated() / 1e9 if cuda else 0.0}
t0 = time.perf_counter()
# the eager model from the folder's own weights (the checkpoint is gone: removed after the build to fit the disk;
# the converter's correctness is CI's test_convert), so the comparison is compiled programs vs eager modules
import itertools
from export.engine_folder import DTYPES, read_manifest
from export.weights import load_weights
manifest = read_manifest(engine_dir, verify_files=False)
with torch.device("meta"):
    model = MiniMaxForCausalLM(engine.config, dtype=DTYPES[manifest["dtype"]])
model.to_empty(device=engine.device)
weights = load_weights(engine_dir, manifest["weights"], engine.device)
with torch.no_grad():
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        t.copy_(weights.pop(name))
assert not weights, sorted(weights)[:5]
model.eval()
res["eager_load_s"] = time.perf_counter() - t0
eager = Engine.from_model(model, engine.max_batch, engine.max_input_len, engine.max_seq_len,
                          page_size=engine.paged_kv["page_size"], num_pages=engine.paged_kv["num_pages"])
g = torch.Generator().manual_seed(0)
prompt = torch.randint(0, model.config.vocab_size, (1, 300), generator=g)
steps = []
for name, e in (("engine", engine), ("eager", eager)):
    e.reset(1)
    out, pos = [], 0
    for a in range(0, prompt.shape[1], e.max_input_len):
        ids = prompt[:, a:a + e.max_input_len]
        logits = e.prefill(ids.to(e.device), torch.tensor([a], device=e.device), [a])
        pos = a + ids.shape[1]
    out.append(logits.float().cpu())
    tok = logits.argmax(-1).cpu()
    ref_tokens = steps[0]["tokens"] if steps else None
    tokens = []
    for i in range(16):
        feed = tok if ref_tokens is None else torch.tensor([ref_tokens[i]])
        tokens.append(int(feed[0]))
        logits = e.decode(feed.view(1, 1).to(e.device), torch.tensor([pos], device=e.device), [pos])
        out.append(logits.float().cpu())
        tok = logits.argmax(-1).cpu()
        pos += 1
    steps.append({"logits": out, "tokens": tokens})
a, b = steps[0]["logits"], steps[1]["logits"]
per = []
for x, y in zip(a, b):
    lp, lq = torch.log_softmax(y, -1), torch.log_softmax(x, -1)
    per.append({"max_abs": float((x - y).abs().max()), "kl": float((lp.exp() * (lp - lq)).sum()),
                "top1_same": bool(x.argmax() == y.argmax()), "logit_scale": float(y.abs().max())})
res["parity"] = {"steps": len(per), "max_abs": max(p["max_abs"] for p in per), "max_kl": max(p["kl"] for p in per),
                 "top1_agreement": sum(p["top1_same"] for p in per) / len(per),
                 "max_logit": max(p["logit_scale"] for p in per), "per_step": per}
print("RESULT " + json.dumps(res))
"""


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="where the checkpoint and engine folder go (removed after)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.real_scale: needs a CUDA GPU", file=sys.stderr)
        return 2
    root = Path(args.workdir)
    if root.exists():
        shutil.rmtree(root)
    result: dict = {"environment": environment(), "command": "python -m benchmarks.real_scale " + " ".join(argv or sys.argv[1:])}
    result["disk_free_gb"] = shutil.disk_usage(root.parent).free / 1e9
    try:
        ckpt = write_checkpoint(root / "ckpt", args.layers)
        result["checkpoint"] = ckpt
        print(f"checkpoint: {ckpt['bytes'] / 1e9:.2f} GB, {ckpt['shards']} shards, {ckpt['write_s']:.1f}s", flush=True)
        result["disk_read_gbps"] = disk_read_gbps(root / "ckpt" / "model-00001.safetensors")
        result["h2d_gbps"] = h2d_gbps()
        print(f"disk read (O_DIRECT) {result['disk_read_gbps']:.2f} GB/s, pinned H2D {result['h2d_gbps']:.2f} GB/s",
              flush=True)
        engine = root / "engine"
        cmd = [sys.executable, "build.py", "--checkpoint", str(root / "ckpt"), "--out", str(engine), "--backend", "aoti",
               "--device", "cuda", "--dtype", "bf16", "--max-batch", "2", "--max-input-len", "256", "--max-seq-len",
               "4096", "--page-size", "256"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        result["build"] = {"command": " ".join(cmd[1:]), "seconds": time.perf_counter() - t0, "rc": r.returncode,
                           "peak_rss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9,
                           "log_tail": r.stderr[-4000:]}
        print(r.stderr[-3000:], flush=True)
        if r.returncode != 0:
            write_json(args.out, result)
            return 1
        shutil.rmtree(root / "ckpt")  # the disk holds the checkpoint or the folder twice over, not both (64 GB)
        result["folder_bytes"] = folder_bytes(engine)
        weights = [f for f in (engine / "weights").iterdir()]
        result["folder_weight_bytes"] = sum(f.stat().st_size for f in weights)
        for f in weights:
            _drop_cache(f)
        r = subprocess.run([sys.executable, "-c", CHILD, str(engine), str(root / "ckpt")], capture_output=True,
                           text=True, check=False)
        print(r.stderr[-3000:], flush=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            result["load_error"] = r.stderr[-3000:]
            write_json(args.out, result)
            return 1
        child = json.loads(line[-1][7:])
        result.update(child)
        # where the load's time went: the weight stream's summary and each package's load / constants times
        result["load_log"] = [x for x in r.stderr.splitlines() if "runtime.backends loaded" in x
                              or ("export.weights" in x and " tensors, " in x)]
        result["load_gbps"] = result["folder_weight_bytes"] / child["load_s"] / 1e9
        floor = min(result["disk_read_gbps"], result["h2d_gbps"])
        result["load_vs_slower_bandwidth"] = result["load_gbps"] / floor
        par = child["parity"]
        print(f"build {result['build']['seconds']:.0f}s (peak RSS {result['build']['peak_rss_gb']:.1f} GB); folder "
              f"{result['folder_bytes'] / 1e9:.2f} GB; load {child['load_s']:.1f}s = {result['load_gbps']:.2f} GB/s "
              f"({result['load_vs_slower_bandwidth']:.2f}x of {floor:.2f}); parity max|d| {par['max_abs']:.4f} "
              f"KL {par['max_kl']:.2e} top-1 {par['top1_agreement']:.3f}", flush=True)
        write_json(args.out, result)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
