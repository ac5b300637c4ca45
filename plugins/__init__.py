"""TensorRT plugins (namespace ``minimax``, version ``"1"``) for lightning attention, the MoE stages and paged
softmax attention.

Importing this package does not import TensorRT: the contract (``spec.PLUGINS``), the launch plans and the Triton
entry kernels work without it. ``register_all()`` registers every plugin with ``tensorrt.plugin`` (TensorRT >= 10.9,
AOT implementations, so an engine runs without Python), and the two collectives of tensor-parallel rank engines
(``collectives.py``: JIT plugins around ``torch.distributed``). See README.md for the table, the ABI and what was run where.
"""

import logging

from . import attention, collectives, lightning_attention, moe
from .payload import HIDDEN_PARAMS, KernelPlan, Payload, compile_plan
from .spec import NAMESPACE, PLUGINS, VERSION, PluginSpec

__all__ = [
    "NAMESPACE", "VERSION", "PLUGINS", "PLANNERS", "TACTICS", "PluginSpec", "KernelPlan", "Payload", "HIDDEN_PARAMS",
    "plan", "build_payload", "register_all",
]  # fmt: skip

log = logging.getLogger(__name__)

PLANNERS = {**lightning_attention.PLANNERS, **moe.PLANNERS, **attention.PLANNERS}
TACTICS = {**lightning_attention.TACTICS, **moe.TACTICS, **attention.TACTICS}

_registered = False


def plan(name, dtypes, shapes, attrs=None, tactic=None) -> KernelPlan:
    """The launch plan of plugin ``name`` (``aot_impl``'s decisions) for these dtypes, shapes, attributes, tactic."""
    if name not in PLANNERS:
        raise KeyError(f"unknown plugin {name!r}; known: {sorted(PLANNERS)}")
    return PLANNERS[name](list(dtypes), [tuple(s) for s in shapes], dict(attrs or {}), tactic or TACTICS[name][0])


def build_payload(name, dtypes, shapes, attrs=None, tactic=None, target=None) -> Payload:
    """``plan`` + compile to PTX, exactly as ``aot_impl`` does (``target``: a GPUTarget, None = the current GPU)."""
    return compile_plan(plan(name, dtypes, shapes, attrs, tactic), target=target)


def register_all() -> None:
    """Register every plugin with ``tensorrt.plugin`` (once per process). Raises ImportError without TensorRT."""
    global _registered
    if _registered:
        return
    lightning_attention.register()
    moe.register()
    attention.register()
    collectives.register()  # JIT (Python) plugins around torch.distributed, for tensor-parallel rank engines
    _registered = True
    log.info("registered %d TensorRT plugins in namespace %r: %s, %s", len(PLUGINS) + len(collectives.COLLECTIVES),
             NAMESPACE, ", ".join(PLUGINS), ", ".join(collectives.COLLECTIVES))
