"""Run a plugin's AOT payload on torch tensors the way TensorRT launches it, without TensorRT.

``run(name, inputs, attrs)`` plans the launch from the tensors' dtypes and shapes (``plugins.plan``, as
``aot_impl`` does on TensorRT's shape expressions), allocates the outputs with the spec's shape rule (poisoned with
NaN / a large integer so that an unwritten element shows), and launches:

- CUDA tensors: the payload's PTX is loaded with the CUDA driver API (``cuda.bindings.driver``: ``cuModuleLoadData``,
  ``cuModuleGetFunction``, ``cuFuncSetAttribute`` for more than 48 KB of shared memory, ``cuLaunchKernel``) and launched
  on the current torch stream with TensorRT's AOT argument list: input pointers, int32 extra args, output pointers,
  then Triton's two hidden scratch pointers (null).
- CPU tensors: the entry kernel itself under ``TRITON_INTERPRET=1`` (set before ``plugins`` / ``kernels`` import),
  with the same argument order, grid and constexprs.

Used by the tests and for debugging; nothing in an engine depends on it.
"""

import ctypes
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from . import PLUGINS, build_payload, plan
from .payload import HIDDEN_PARAMS, KernelPlan, Payload

__all__ = ["run", "launch", "alloc_outputs"]

log = logging.getLogger(__name__)

_MODULES: dict[str, tuple[object, object]] = {}  # PTX -> (CUmodule, CUfunction)
_DEFAULT_SHARED = 48 * 1024


def alloc_outputs(name: str, inputs: Sequence[Tensor], attrs: Mapping[str, int], poison: bool = True) -> list[Tensor]:
    """Output buffers of plugin ``name`` for these inputs (spec shape and dtype rules)."""
    spec = PLUGINS[name]
    shapes = spec.output_shapes([tuple(t.shape) for t in inputs], dict(attrs))
    dtypes = spec.output_dtypes([t.dtype for t in inputs])
    dev = inputs[0].device
    outs = []
    for shape, dtype in zip(shapes, dtypes):
        t = torch.empty(tuple(int(d) for d in shape), dtype=dtype, device=dev)
        if poison:
            t.fill_(float("nan") if dtype.is_floating_point else 1 << 30)
        outs.append(t)
    return outs


def _check(p: KernelPlan, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> None:
    for (n, dtype), t in zip((*p.inputs, *p.outputs), (*inputs, *outputs)):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{p.plugin}: tensor '{n}' must be contiguous {dtype}; got {t.dtype} strides {t.stride()}")
    if len(inputs) != len(p.inputs) or len(outputs) != len(p.outputs):
        raise ValueError(f"{p.plugin}: expected {len(p.inputs)} inputs and {len(p.outputs)} outputs")


def _cu_check(result, what: str):
    from cuda.bindings import driver as cu

    err, *rest = result
    if err != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{what} failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def _function(payload: Payload):
    """Load the payload's PTX once per process (the driver JIT-compiles it for this GPU)."""
    from cuda.bindings import driver as cu

    if payload.ptx not in _MODULES:
        image = ctypes.create_string_buffer(payload.ptx.encode())  # NUL-terminated PTX text
        module = _cu_check(cu.cuModuleLoadData(ctypes.addressof(image)), f"cuModuleLoadData({payload.kernel_name})")
        fn = _cu_check(cu.cuModuleGetFunction(module, payload.kernel_name.encode()), "cuModuleGetFunction")
        if payload.shared_mem > _DEFAULT_SHARED:
            attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _cu_check(cu.cuFuncSetAttribute(fn, attr, payload.shared_mem), "cuFuncSetAttribute(shared)")
        _MODULES[payload.ptx] = (module, fn)
    return _MODULES[payload.ptx][1]


def launch(payload: Payload, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> None:
    """Launch a compiled payload on CUDA tensors with TensorRT's AOT argument list (see the module docstring)."""
    from cuda.bindings import driver as cu

    p = payload.plan
    _check(p, inputs, outputs)
    fn = _function(payload)
    extras = p.concrete_extra_args()
    values = [t.data_ptr() for t in inputs] + list(extras) + [t.data_ptr() for t in outputs] + [0] * HIDDEN_PARAMS
    types = (
        [ctypes.c_void_p] * len(inputs) + [ctypes.c_int32] * len(extras) + [ctypes.c_void_p] * (len(outputs) + HIDDEN_PARAMS)
    )
    gx, gy, gz = p.concrete_grid()
    stream = cu.CUstream(torch.cuda.current_stream(inputs[0].device).cuda_stream)
    _cu_check(
        cu.cuLaunchKernel(fn, gx, gy, gz, payload.block, 1, 1, payload.shared_mem, stream, (tuple(values), tuple(types)), 0),
        f"cuLaunchKernel({payload.kernel_name})",
    )


def _interpret(p: KernelPlan, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> None:
    _check(p, inputs, outputs)
    p.fn[p.concrete_grid()](*inputs, *p.concrete_extra_args(), *outputs, **p.constexprs, num_warps=p.num_warps)


def run(
    name: str,
    inputs: Sequence[Tensor],
    attrs: Mapping[str, int] | None = None,
    tactic: int | None = None,
    outputs: Sequence[Tensor] | None = None,
    constexpr_overrides: Mapping[str, object] | None = None,
) -> list[Tensor]:
    """Plan, (compile,) launch plugin ``name`` on ``inputs``; returns the outputs (new poisoned buffers by default).

    ``constexpr_overrides`` (interpreter only) replaces plan constants the interpreter cannot honour (e.g. tf32x3).
    """
    attrs = dict(attrs or {})
    p = plan(name, [t.dtype for t in inputs], [tuple(t.shape) for t in inputs], attrs, tactic)
    outs = list(outputs) if outputs is not None else alloc_outputs(name, inputs, attrs)
    if inputs[0].is_cuda:
        if constexpr_overrides:
            raise ValueError("constexpr_overrides are for the interpreter only: the GPU runs the payload as planned")
        launch(build_payload(name, [t.dtype for t in inputs], [tuple(t.shape) for t in inputs], attrs, p.tactic), inputs, outs)
    else:
        if constexpr_overrides:
            from dataclasses import replace

            p = replace(p, constexprs={**p.constexprs, **constexpr_overrides})
        _interpret(p, inputs, outs)
    return outs
