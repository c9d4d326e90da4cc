"""bf16 in Triton's CPU interpreter (Triton 3.4-3.9): a small, explicit correction, installed on demand.

Triton's interpreter (``TRITON_INTERPRET=1``) holds bf16 tensors as their raw ``uint16`` bit patterns and
then treats those patterns as integers in three places (``triton/runtime/interpreter.py``,
``InterpreterBuilder``):

- ``create_dot``: ``np.matmul`` of the ``uint16`` arrays — it multiplies bit patterns, not values;
- ``cast_impl`` (``create_fp_trunc``, used by ``x.to(tl.bfloat16)`` from fp32 / fp64, and the int -> bf16
  casts): fp32 -> bf16 truncates the mantissa where a GPU rounds to nearest even, and fp64 / int -> bf16
  go through ``astype(uint16)``, an integer conversion (the fix takes these through fp32);
- ``binary_op`` / ``unary_op`` / ``create_fma``: arithmetic on two bf16 tiles (``a * b``, both bf16, stays
  bf16 in Triton's type rules) adds or multiplies the bit patterns.

:func:`install_bf16_interpreter_fix` replaces those methods by versions that, for bf16 operands only,
decode the values exactly to fp32 (bf16 is the top half of an fp32), compute in fp32 — ``tl.dot``
accumulates in fp32 as tensor cores do — and round fp32 -> bf16 to nearest even (NaN stays NaN), the
rounding of a GPU's ``cvt.rn.bf16.f32``. Every other dtype goes to the original method unchanged, so
fp16 / fp32 / integer behaviour is the interpreter's own. Installing is idempotent and does nothing when
the interpreter is off (:func:`triton_interpreter`). Tests install it from ``tests/conftest.py``; at run
time ``fastpeft.ops.dispatch`` installs it the first time an op is sent to the Triton backend under the
interpreter, so bf16 inputs give correct results there instead of silent garbage.

Not covered (fastpeft's kernels do none of it): reductions (``tl.sum``) and atomics directly on bf16
tiles, and fp8. A triton whose interpreter lacks the patched methods makes installing raise, rather than
run uncorrected, and so does a Triton whose interpreter cannot run with the installed numpy
(:func:`fastpeft.kernels.versions.interpreter_numpy_error`).
"""

from __future__ import annotations

import os

import numpy as np

from .versions import interpreter_numpy_error

_installed = False
# the interpreter's own methods, kept so every non-bf16 call goes to them (and tests can compare)
ORIGINALS: dict = {}


def triton_interpreter() -> bool:
    """True when Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (``uint16``) -> their exact fp32 values (same shape)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """fp32 values -> bf16 bit patterns (``uint16``), rounded to nearest, ties to even; NaN -> quiet NaN."""
    values = np.asarray(values, dtype=np.float32)
    bits = values.view(np.uint32).astype(np.uint64)  # uint64: the rounding bias cannot overflow
    lsb = (bits >> np.uint64(16)) & np.uint64(1)
    rounded = ((bits + np.uint64(0x7FFF) + lsb) >> np.uint64(16)).astype(np.uint16)
    quiet_nan = ((bits >> np.uint64(16)).astype(np.uint16) | np.uint16(0x0040))
    return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)


def install_bf16_interpreter_fix() -> bool:
    """Patch Triton's interpreter so bf16 dots, casts and arithmetic use the bf16 values (see module doc).

    Returns True when the fix is in place (now or from an earlier call), False when ``TRITON_INTERPRET``
    is not ``1`` (compiled kernels are not affected and need nothing).
    """
    global _installed
    if _installed:
        return True
    if not triton_interpreter():
        return False
    import triton
    import triton.language as tl
    from triton.runtime import interpreter as interp

    problem = interpreter_numpy_error(triton.__version__, np.__version__)
    if problem:
        raise RuntimeError(problem)
    builder_cls = interp.InterpreterBuilder
    handle_cls = interp.TensorHandle
    bf16 = tl.bfloat16
    originals = ORIGINALS
    originals.update({name: getattr(builder_cls, name) for name in
                      ("create_dot", "cast_impl", "create_fp_to_fp", "binary_op", "unary_op", "create_fma")})

    def values(handle):
        """fp32 values of a bf16 handle; other handles' data as it is."""
        return bf16_bits_to_fp32(handle.data) if handle.dtype.scalar == bf16 else handle.data

    def is_bf16(*handles):
        return any(h.dtype.scalar == bf16 for h in handles)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if not is_bf16(a, b, d):
            return originals["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)
        acc = np.matmul(values(a).astype(np.float32), values(b).astype(np.float32)) + values(d).astype(np.float32)
        if d.dtype.scalar == bf16:
            return handle_cls(fp32_to_bf16_bits(acc), bf16)
        return handle_cls(acc.astype(interp._get_np_dtype(d.dtype)), d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if dst_ty == bf16 and src_ty != bf16:
            return handle_cls(fp32_to_bf16_bits(src.data.astype(np.float32)), bf16)
        if src_ty == bf16 and dst_ty != bf16:
            return handle_cls(bf16_bits_to_fp32(src.data).astype(interp._get_np_dtype(dst_type)), dst_ty)
        return originals["cast_impl"](self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        # bf16 <-> fp16 (the only create_fp_to_fp casts fastpeft's kernels reach with bf16) go through fp32
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if (src_ty == bf16) != (dst_ty == bf16) and not (src_ty.is_fp8() or dst_ty.is_fp8()):
            return cast_impl(self, src, dst_type)
        return originals["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    def binary_op(self, lhs, rhs, op):
        if not is_bf16(lhs, rhs):
            return originals["binary_op"](self, lhs, rhs, op)
        out = op(values(lhs).astype(np.float32), values(rhs).astype(np.float32))
        if out.dtype == np.float32:  # arithmetic; comparisons give bool and keep it
            out = fp32_to_bf16_bits(out)
        return handle_cls(out, lhs.dtype.scalar)

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return originals["unary_op"](self, arg, op)
        return handle_cls(fp32_to_bf16_bits(op(values(arg))), bf16)

    def create_fma(self, x, y, z):
        if not is_bf16(x, y, z):
            return originals["create_fma"](self, x, y, z)
        exact = np.add(np.multiply(values(x), values(y), dtype=np.float64), values(z), dtype=np.float64)
        return handle_cls(fp32_to_bf16_bits(exact.astype(np.float32)), bf16)

    builder_cls.create_dot = create_dot
    builder_cls.cast_impl = cast_impl
    builder_cls.create_fp_to_fp = create_fp_to_fp
    builder_cls.binary_op = binary_op
    builder_cls.unary_op = unary_op
    builder_cls.create_fma = create_fma
    _installed = True
    return True
