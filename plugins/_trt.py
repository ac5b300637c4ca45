"""Glue between the plans (no TensorRT) and ``tensorrt.plugin``; imported only by the ``register`` functions.

The same three helpers serve every plugin: ``output_descs`` (``@trtp.register``: output shapes from the spec's
shape rule on the inputs' ``ShapeExpr``s, output dtypes from the spec's dtype table), ``combinations``
(``@trtp.autotune``: one ``AutoTuneCombination`` per supported dtype combination, LINEAR layout, the plugin's
tactics) and ``aot`` (``@trtp.aot_impl``: plan -> PTX -> ``KernelLaunchParams`` + ``SymIntExprs``).
"""

import logging
from collections.abc import Mapping, Sequence

import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from . import PLANNERS, TACTICS
from .payload import compile_plan
from .spec import PLUGINS

log = logging.getLogger(__name__)

_TO_TORCH = {trt.bfloat16: torch.bfloat16, trt.float16: torch.float16, trt.float32: torch.float32, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.int8: torch.int8}
_TO_TRT = {v: k for k, v in _TO_TORCH.items()}
_TOKEN = {torch.bfloat16: "BF16", torch.float16: "FP16", torch.float32: "FP32", torch.int32: "INT32",
          torch.int64: "INT64", torch.int8: "INT8"}


def _torch_dtype(name: str, tensor: str, dtype) -> torch.dtype:
    if dtype not in _TO_TORCH:
        raise ValueError(f"{name}: input '{tensor}' has TensorRT dtype {dtype}; supported: bf16, fp16, fp32, int32, "
                         "int64, int8")
    return _TO_TORCH[dtype]


def output_descs(name: str, inputs: Sequence["trtp.TensorDesc"], attrs: Mapping[str, int]):
    """``@trtp.register`` body. TensorRT also calls it with placeholder dims, so nothing here reads dim values."""
    spec = PLUGINS[name]
    shapes = [tuple(d.shape_expr) for d in inputs]
    dtypes = spec.output_dtypes([_torch_dtype(name, n, d.dtype) for n, d in zip(spec.inputs, inputs)])
    aliases = spec.aliases or (None,) * len(spec.outputs)
    descs = tuple(
        inputs[alias].aliased() if alias is not None  # in place: the output is the input's memory (TensorRT >= 10.6)
        else trtp.from_shape_expr(shape, dtype=_TO_TRT[dt])
        for shape, dt, alias in zip(spec.output_shapes(shapes, attrs), dtypes, aliases)
    )
    return descs if len(descs) > 1 else descs[0]


def combinations(name: str, tactics: Sequence[int]) -> list:
    """``@trtp.autotune`` body: every dtype combination of the spec, LINEAR, with the plugin's tactics."""
    spec = PLUGINS[name]
    return [
        trtp.AutoTuneCombination(", ".join(_TOKEN[d] for d in combo), "LINEAR", list(tactics))
        for combo in spec.dtype_combinations
    ]


def _sym(d):
    return d if isinstance(d, int) else trtp.SymInt32(d)


def aot(name: str, inputs: Sequence["trtp.TensorDesc"], attrs: Mapping[str, int], tactic: int):
    """``@trtp.aot_impl`` body: (kernel name, PTX, launch params, extra args)."""
    spec = PLUGINS[name]
    dtypes = [_torch_dtype(name, n, d.dtype) for n, d in zip(spec.inputs, inputs)]
    shapes = [tuple(d.shape_expr) for d in inputs]
    tactic = tactic if tactic in TACTICS[name] else TACTICS[name][0]  # TensorRT passes 0 when it did not tune
    payload = compile_plan(PLANNERS[name](dtypes, shapes, dict(attrs), tactic))
    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y, launch.grid_z = (_sym(g) for g in payload.grid)
    launch.block_x = payload.block
    launch.shared_mem = payload.shared_mem
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(d) for d in payload.extra_args])
    log.info("%s: AOT kernel %s (tactic %d, %d threads, %d B shared)", name, payload.kernel_name, tactic,
             payload.block, payload.shared_mem)  # fmt: skip
    return payload.kernel_name, payload.ptx, launch, extra
