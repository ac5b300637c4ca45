"""AOT payloads: a plugin's Triton entry kernel compiled to PTX, with its launch parameters.

A ``KernelPlan`` is everything ``@trtp.aot_impl`` decides for one (dtypes, shapes, attributes, tactic): the entry
kernel, its Triton signature (TensorRT's argument order: input pointers, int32 extra args, output pointers), the
compile-time constants, the grid and the extra args as dims (ints, or TensorRT ``ShapeExpr``s; see ``algebra.py``),
num_warps and num_stages. ``compile_plan`` turns it into a ``Payload`` (kernel name, PTX, block = num_warps * 32,
shared memory) with ``triton.compiler.ASTSource`` (Triton >= 3.3 dict form) + ``triton.compile``. Tests evaluate
the same plan on ints and launch it (``TRITON_INTERPRET=1`` on CPU, or the PTX through the CUDA driver on a GPU).

ABI notes:
- Triton 3.6 appends two hidden pointer parameters (global and profile scratch) to every kernel; the payload
  records ``hidden_params = 2`` and refuses kernels that need scratch memory (``*_scratch_size > 0``), since
  TensorRT would pass nothing (or null) there.
- Every pointer is compiled as 16-byte aligned (``tt.divisibility = 16``), as Triton's own launcher does for
  aligned tensors; TensorRT's I/O and activation buffers are 256-byte aligned. An int argument is marked divisible
  by 16 only when its value is a build-time constant that is (Triton's launcher does the same by value).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .algebra import Dim, is_static, static

__all__ = ["KernelPlan", "Payload", "compile_plan", "TRITON_TYPES", "HIDDEN_PARAMS"]

log = logging.getLogger(__name__)

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                torch.int64: "i64", torch.int8: "i8"}
HIDDEN_PARAMS = 2  # Triton 3.6 (and 3.9): global_scratch, profile_scratch pointers after the visible params


@dataclass(frozen=True)
class KernelPlan:
    """One kernel launch of a plugin, before compilation.

    ``inputs`` / ``outputs``: (name, dtype) in the plugin's order; ``extra_args``: (name, dim) int32 scalars that sit
    between them; ``constexprs``: compile-time constants of the entry kernel; ``grid``: three dims.
    """

    plugin: str
    fn: Any  # the @triton.jit entry kernel
    inputs: tuple[tuple[str, torch.dtype], ...]
    extra_args: tuple[tuple[str, Dim], ...]
    outputs: tuple[tuple[str, torch.dtype], ...]
    constexprs: dict[str, Any]
    grid: tuple[Dim, Dim, Dim]
    num_warps: int
    num_stages: int = 3
    tactic: int = 1

    @property
    def arg_names(self) -> tuple[str, ...]:
        """Visible kernel parameters in TensorRT's order (inputs, extra args, outputs)."""
        return tuple(n for n, _ in self.inputs) + tuple(n for n, _ in self.extra_args) + tuple(n for n, _ in self.outputs)

    def signature(self) -> dict[str, str]:
        sig = {n: f"*{TRITON_TYPES[d]}" for n, d in self.inputs}
        sig.update({n: "i32" for n, _ in self.extra_args})
        sig.update({n: f"*{TRITON_TYPES[d]}" for n, d in self.outputs})
        sig.update({n: "constexpr" for n in self.constexprs})
        return sig

    def divisibility_attrs(self) -> dict[tuple[int, ...], list[list[Any]]]:
        """``tt.divisibility = 16`` on every pointer and on constant int args that are multiples of 16."""
        index = {n: i for i, n in enumerate(self.fn.arg_names)}
        attrs = {(index[n],): [["tt.divisibility", 16]] for n, _ in (*self.inputs, *self.outputs)}
        for n, d in self.extra_args:
            if is_static(d) and static(d, n) % 16 == 0 and static(d, n) > 0:
                attrs[(index[n],)] = [["tt.divisibility", 16]]
        return attrs

    def concrete_grid(self) -> tuple[int, int, int]:
        return tuple(static(g, f"{self.plugin} grid") for g in self.grid)  # type: ignore[return-value]

    def concrete_extra_args(self) -> tuple[int, ...]:
        return tuple(static(d, f"{self.plugin} extra arg {n}") for n, d in self.extra_args)


@dataclass(frozen=True)
class Payload:
    """What ``@trtp.aot_impl`` returns, in Python terms (``register`` wraps grid/extra args into TensorRT types)."""

    plan: KernelPlan
    kernel_name: str
    ptx: str
    block: int  # threads per block = num_warps * 32
    shared_mem: int  # dynamic shared memory in bytes
    hidden_params: int = HIDDEN_PARAMS
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[Dim, Dim, Dim]:
        return self.plan.grid

    @property
    def extra_args(self) -> tuple[Dim, ...]:
        return tuple(d for _, d in self.plan.extra_args)


def compile_plan(plan: KernelPlan, target: Any = None) -> Payload:
    """Compile ``plan`` to PTX. ``target``: a ``triton.backends.compiler.GPUTarget`` (None: the current GPU)."""
    import triton

    fn_args = set(plan.fn.arg_names)
    sig = plan.signature()
    if set(sig) != fn_args:
        raise ValueError(f"{plan.plugin}: signature {sorted(sig)} does not match the entry kernel {sorted(fn_args)}")
    visible = [n for n in plan.fn.arg_names if sig[n] != "constexpr"]
    if tuple(visible) != plan.arg_names:
        raise ValueError(f"{plan.plugin}: entry kernel parameters {visible} are not in TensorRT order {plan.arg_names}")
    src = triton.compiler.ASTSource(
        fn=plan.fn, signature=sig, constexprs=dict(plan.constexprs), attrs=plan.divisibility_attrs()
    )
    options = {"num_warps": plan.num_warps, "num_stages": plan.num_stages}
    kernel = triton.compile(src, target=target, options=options) if target is not None else triton.compile(src, options=options)
    md = kernel.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if getattr(md, scratch, 0):
            raise ValueError(
                f"{plan.plugin}: the compiled kernel needs {scratch}={getattr(md, scratch)} bytes; a TensorRT AOT plugin "
                "cannot provide scratch memory"
            )
    payload = Payload(
        plan=plan,
        kernel_name=md.name,
        ptx=kernel.asm["ptx"],
        block=md.num_warps * 32,
        shared_mem=md.shared,
        metadata={"num_warps": md.num_warps, "num_stages": md.num_stages, "shared": md.shared, "target": str(md.target)},
    )
    log.debug("%s tactic %d: %s, %d threads, %d B shared", plan.plugin, plan.tactic, md.name, payload.block, md.shared)
    return payload

