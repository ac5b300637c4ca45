"""Parity of a TensorRT engine with the ONNX reference evaluator and eager PyTorch, through polygraphy's Comparator.

Polygraphy's ``--plugins`` flag only ``ctypes``-loads shared libraries, so our Python plugins (QDPs) cannot reach
the CLI; the comparison runs in-process instead (tensorrt_notes.md §5): ``plugins.register_all()``, then
``Comparator.run`` over runners that all take the engine-folder feed dict (``input_ids``, ``positions``,
``block_table``, state names) and return the engine-folder outputs (``logits``, ``<state>.out``):

- ``tensorrt_runner(plan)``: polygraphy's ``TrtRunner`` over ``EngineFromPath`` (needs TensorRT and a GPU);
- ``ProgramRunner(fn, ...)``: any runtime program ``fn(input_ids, positions, block_table, state) -> (logits,
  state)`` — eager PyTorch (``runtime.backends.InPlaceProgram(exporting.PrefillProgram(model))``), a ``runtime``
  program;
- ``OnnxReferenceRunner(onnx)``: ``export.onnx_reference.OnnxReferenceProgram`` (``onnx.reference`` with our ops'
  reference kernels, CPU, fp32).

``compare`` then calls ``Comparator.compare_accuracy`` with ``CompareFunc.simple(check_error_stat="elemwise")``
(an element passes when within atol OR within rtol; NaN always fails) and per-output tolerances from
``tolerances(dtype)``, and adds our own summary (max |diff| per output, top-1 agreement of the logits).
Precomputed outputs (e.g. from a run elsewhere) enter through ``results_from_outputs``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_DTYPES",
    "tolerances",
    "make_feeds",
    "input_metadata",
    "ProgramRunner",
    "OnnxReferenceRunner",
    "tensorrt_runner",
    "results_from_outputs",
    "ParityReport",
    "compare",
    "compare_results",
]

MANIFEST_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "int64": torch.int64, "int32": torch.int32}


def tolerances(dtype: str) -> tuple[dict[str, float], dict[str, float]]:
    """``(atol, rtol)`` per output name ("" = default) for an engine of weight dtype ``dtype`` vs an fp32-or-same
    dtype reference. fp32 engines are built without TF32 (``tensorrt_lowering``), so they differ from eager only by
    summation order; bf16/fp16 engines round every matmul differently from eager bf16."""
    if dtype == "float32":
        return {"": 1e-4, "logits": 1e-3}, {"": 1e-3, "logits": 1e-3}
    if dtype in ("bfloat16", "float16"):
        return {"": 2e-2, "logits": 1e-1}, {"": 5e-2, "logits": 5e-2}
    raise ValueError(f"no tolerances for dtype {dtype!r}")


def _program(manifest: Mapping[str, Any], program: str) -> Mapping[str, Any]:
    try:
        return manifest["programs"][program]
    except KeyError:
        raise ValueError(f"manifest has no program {program!r}") from None


def input_metadata(manifest: Mapping[str, Any], program: str):
    """polygraphy ``TensorMetadata`` of ``program``'s inputs (dynamic "B"/"T" dims as None)."""
    from polygraphy.common import TensorMetadata

    meta = TensorMetadata()
    for t in _program(manifest, program)["inputs"]:
        meta.add(t["name"], MANIFEST_DTYPES[t["dtype"]], [None if isinstance(d, str) else d for d in t["shape"]])
    return meta


def make_feeds(manifest: Mapping[str, Any], program: str, batch: int, seq: int, *, seed: int = 0,
               device: str | torch.device = "cpu", positions: Tensor | None = None,
               state: Sequence[Tensor] | None = None, block_table: Tensor | None = None) -> "OrderedDict[str, Tensor]":
    """A feed dict for ``program``: random token ids in [0, vocab) (seeded), ``positions`` (default zeros: a fresh
    sequence), ``block_table`` (default: row b owns pages ``b * M ..``) and ``state`` (default zeros) in the
    manifest's input order, on ``device``."""
    entry = _program(manifest, program)
    if program == "decode" and seq != 1:
        raise ValueError(f"decode takes one token per row, got seq {seq}")
    vocab = manifest["model_config"]["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    sizes = {"B": batch, "T": seq}
    feeds: OrderedDict[str, Tensor] = OrderedDict()
    feeds["input_ids"] = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    feeds["positions"] = (positions if positions is not None else torch.zeros(batch, dtype=torch.long)).to(device)
    width = entry["inputs"][2]["shape"][1]
    if block_table is None:
        block_table = torch.arange(batch * width, dtype=torch.int32).view(batch, width)
    if tuple(block_table.shape) != (batch, width) or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32 [{batch}, {width}], got {block_table.dtype} "
                         f"{list(block_table.shape)}")
    feeds["block_table"] = block_table.to(device).contiguous()
    specs = entry["inputs"][3:]
    if state is not None and len(state) != len(specs):
        raise ValueError(f"{len(state)} state tensors given, {program} takes {len(specs)}")
    for i, t in enumerate(specs):
        shape = [sizes[d] if isinstance(d, str) else d for d in t["shape"]]
        value = state[i] if state is not None else torch.zeros(shape, dtype=MANIFEST_DTYPES[t["dtype"]])
        if list(value.shape) != shape:
            raise ValueError(f"state {t['name']} must be {shape}, got {list(value.shape)}")
        feeds[t["name"]] = value.to(device).contiguous()
    return feeds


# ----------------------------------------------------------------------------------------------- runners
def _base_runner():
    from polygraphy.backend.base import BaseRunner

    return BaseRunner


class ProgramRunner(_base_runner()):
    """polygraphy runner over a runtime program ``fn(input_ids, positions, block_table, state) -> (logits, state)``.

    The state is cloned first, so that an in-place program leaves the feeds as they were.

    Inputs are moved to ``device``; outputs come back on the CPU (what ``TrtRunner`` returns for torch feeds).
    """

    def __init__(self, fn: Callable, manifest: Mapping[str, Any], program: str, name: str | None = None,
                 device: str | torch.device = "cpu"):
        super().__init__(name=name, prefix=f"{program}-program")
        self.fn, self.manifest, self.program, self.device = fn, manifest, program, torch.device(device)
        entry = _program(manifest, program)
        self.input_names = [t["name"] for t in entry["inputs"]]
        self.output_names = [t["name"] for t in entry["outputs"]]

    def get_input_metadata_impl(self):
        return input_metadata(self.manifest, self.program)

    def infer_impl(self, feed_dict):
        args = [torch.as_tensor(feed_dict[n]).to(self.device).contiguous() for n in self.input_names]
        start = time.perf_counter()
        with torch.no_grad():
            logits, state = self.fn(args[0], args[1], args[2], [t.clone() for t in args[3:]])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.inference_time = time.perf_counter() - start
        return OrderedDict(zip(self.output_names, [t.detach().cpu() for t in (logits, *state)]))


def OnnxReferenceRunner(onnx_path: str | Path, manifest: Mapping[str, Any], program: str, name: str | None = None
                        ) -> ProgramRunner:
    """A runner over ``export.onnx_reference.OnnxReferenceProgram`` (CPU, fp32 graphs, our ops as ``onnx.reference``
    kernels), with the same feeds and outputs as the other runners."""
    from export.onnx_reference import OnnxReferenceProgram

    return ProgramRunner(OnnxReferenceProgram(onnx_path), manifest, program, name=name or f"onnx-reference[{program}]")


def tensorrt_runner(plan_path: str | Path, name: str | None = None):
    """polygraphy ``TrtRunner`` over a serialized plan, with our plugins registered in this process first."""
    import plugins
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    plugins.register_all()  # --plugins cannot load Python plugins: register them in-process
    return TrtRunner(EngineFromPath(str(plan_path)), name=name or f"tensorrt[{Path(plan_path).name}]")


def results_from_outputs(outputs: Mapping[str, Sequence[Mapping[str, Any]]]):
    """A polygraphy ``RunResults`` from precomputed outputs: ``{runner name: [outputs of iteration i]}``."""
    from polygraphy.comparator import RunResults

    results = RunResults()
    for name, iterations in outputs.items():
        results.add([OrderedDict((k, torch.as_tensor(v)) for k, v in it.items()) for it in iterations],
                    runner_name=name)
    return results


# ----------------------------------------------------------------------------------------------- comparison
@dataclass
class ParityReport:
    """Outcome of one comparison: polygraphy's verdict and our per-output statistics (runner 0 vs runner 1)."""

    passed: bool
    max_abs: dict[str, float] = field(default_factory=dict)  # output -> max |diff| over iterations
    top1: float = float("nan")  # logits argmax agreement over all iterations and rows
    runners: tuple[str, ...] = ()

    def __str__(self) -> str:
        worst = sorted(self.max_abs.items(), key=lambda kv: -kv[1])[:3]
        return (f"{'PASSED' if self.passed else 'FAILED'} {' vs '.join(self.runners)}: top-1 {self.top1:.4f}, "
                f"max |diff| {', '.join(f'{k} {v:.3g}' for k, v in worst)}")


def _statistics(results) -> tuple[dict[str, float], float]:
    (_, first), (_, second) = list(results.items())[:2]
    max_abs: dict[str, float] = {}
    agree, total = 0, 0
    for a, b in zip(first, second):
        for name in a.keys():
            x, y = torch.as_tensor(a[name]).double(), torch.as_tensor(b[name]).double()
            diff = (x - y).abs().max().item() if x.numel() else 0.0
            if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
                diff = float("inf")
            max_abs[name] = max(max_abs.get(name, 0.0), diff)
            if name == "logits":
                agree += (x.argmax(-1) == y.argmax(-1)).sum().item()
                total += x.argmax(-1).numel()
    return max_abs, (agree / total if total else float("nan"))


def compare_results(results, atol: Mapping[str, float], rtol: Mapping[str, float]) -> ParityReport:
    """Compare runner 0 with runner 1 of a polygraphy ``RunResults`` (every iteration, every output)."""
    from polygraphy.comparator import CompareFunc, Comparator
    from polygraphy.logger import G_LOGGER

    if len(results) < 2:
        raise ValueError("need the results of two runners to compare")
    # Before compare_accuracy: polygraphy adds an epsilon in place to zeros of the second runner's torch outputs.
    max_abs, top1 = _statistics(results)
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # polygraphy prints to stdout; keep only its mismatch reports
        accuracy = Comparator.compare_accuracy(
            results, compare_func=CompareFunc.simple(check_shapes=True, atol=dict(atol), rtol=dict(rtol),
                                                     check_error_stat="elemwise")
        )
    report = ParityReport(bool(accuracy), max_abs, top1, tuple(results.keys())[:2])
    logger.info("%s", report)
    return report


def compare(runners: Sequence, feeds: Sequence[Mapping[str, Tensor]], atol: Mapping[str, float],
            rtol: Mapping[str, float]) -> ParityReport:
    """Run every runner on every feed dict (``Comparator.run``) and compare runner 0 with runner 1."""
    from polygraphy.comparator import Comparator

    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        results = Comparator.run(list(runners), data_loader=list(feeds))
    return compare_results(results, atol, rtol)
