"""A tiny shape algebra shared by the output-shape rules and the launch parameters of every plugin.

A *dim* is either a Python ``int`` (tests, concrete launches) or a symbolic TensorRT ``tensorrt.plugin.ShapeExpr``
(inside ``@trtp.register`` / ``@trtp.aot_impl``). ``ShapeExpr`` defines ``+ - * //`` (and ``==``, ``<``) with the
symbolic operand on the **left** only (no reflected operators), so every expression in ``plugins/`` is written
``dim * 2``, never ``2 * dim``; the CPU tests evaluate the same expressions on a stand-in class without reflected
operators to hold the code to that. Nothing here imports tensorrt.
"""

from __future__ import annotations

from typing import Any, Union

__all__ = ["Dim", "cdiv", "static", "is_static", "next_pow2"]

Dim = Union[int, Any]  # int or tensorrt.plugin.ShapeExpr


def cdiv(a: Dim, b: int) -> Dim:
    """Ceiling division of a (non-negative) dim by a positive int: ``(a + b - 1) // b``, symbolic-safe."""
    if not isinstance(b, int) or b <= 0:
        raise ValueError(f"cdiv: the divisor must be a positive int; got {b!r}")
    if isinstance(a, int):
        return -(-a // b)
    return (a + (b - 1)) // b


def is_static(d: Dim) -> bool:
    """Whether a dim is known at build time (an int, or a constant ShapeExpr)."""
    if isinstance(d, int):
        return True
    if getattr(d, "is_fake", False):
        return False
    return bool(getattr(d, "is_constant", False))


def static(d: Dim, what: str) -> int:
    """The build-time value of a dim, or ``ValueError`` naming it (``what``) when it is only known at run time."""
    if isinstance(d, int):
        return d
    if is_static(d):
        return int(d.constant_value())
    raise ValueError(f"{what} must be a build-time constant (a fixed network dimension); it is dynamic: {d!r}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
