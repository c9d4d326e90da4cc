"""NF4: the 4-bit NormalFloat weight format of QLoRA, read and written exactly as bitsandbytes does.

Format (bitsandbytes ``quant_type="nf4"``): the weight ``(out, in)`` is flattened row-major and cut
into blocks of ``blocksize`` elements. Each block stores its absmax; each element stores the index
(0..15) of the NF4 code value nearest to ``x / absmax``. Two indices per byte, the first element of
a pair in the high nibble. An odd element count is padded with the index of code value 0.0.

Double quantisation (``compress_statistics=True`` / ``bnb_4bit_use_double_quant=True``): the fp32
absmaxes minus their mean (``offset``) are quantised again, blockwise with 256 per block, to uint8
indices into bitsandbytes' signed 8-bit dynamic code, each 256-block with its own fp32 absmax.

Arithmetic order (kept identical to bitsandbytes for bit-exact results): quantisation scales by
``x * (1 / absmax)`` in fp32 and picks the NF4 code by comparing with the midpoints between adjacent
code values (ties go to the lower code); the nested 8-bit level is rounded the way bitsandbytes'
backend for that device rounds it (see ``NF4Weight.quantize``); dequantisation rebuilds a nested absmax as
``code2[q] * absmax2[j // 256]`` then ``+ offset``, each rounded to fp32, then computes
``code[idx] * absmax`` in fp32 and casts once to the target dtype.

This module is the format and its plain-PyTorch reference; the Triton dequantiser is in
``fastpeft/kernels/nf4.py``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["NF4_CODE", "NF4Weight", "dynamic_code", "SUPPORTED_BLOCKSIZES"]

# The 16 NF4 values (quantiles of N(0, 1) normalised to [-1, 1], QLoRA paper, Appendix E), as fp32.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the second (absmax) quantisation level
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (256 sorted fp32 values), used for nested absmax.

    For each decimal exponent ``e = -6..0`` it holds ``±10**e`` times the midpoints of ``2**(e+6) + 1``
    points evenly spaced over [0.1, 1], plus 0 and 1 (Dettmers, 8-bit approximations, 2015).
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _blockwise_scale(flat: torch.Tensor, blocksize: int, divide_remainder: bool, ignore_nan: bool = False):
    """Per-block absmax of fp32 ``flat`` and the values scaled into [-1, 1]: ``x * (1 / absmax)``; the
    trailing partial block is divided instead where bitsandbytes does so (its CPU 4-bit path). A NaN makes its
    block's absmax NaN, or with ``ignore_nan`` is left out of it (0 for a block of NaN: bitsandbytes' CPU 8-bit
    quantiser)."""
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    magnitude = padded.abs()
    if ignore_nan:
        magnitude = torch.nan_to_num(magnitude, nan=0.0, posinf=float("inf"))
    absmax = magnitude.amax(dim=1)
    safe = absmax.clamp(min=1e-38).unsqueeze(1)
    scaled = padded * (1.0 / safe)
    full = n // blocksize
    if divide_remainder and full < n_blocks:
        scaled[full:] = padded[full:] / safe[full:]
    return scaled.reshape(-1)[:n], absmax


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest sorted ``code`` value; a value exactly on a midpoint takes the lower code
    (bitsandbytes' NF4 threshold tree uses strict ``>``, as bucketize does)."""
    return torch.bucketize(scaled.clamp(-1.0, 1.0), (code[:-1] + code[1:]) / 2)


def _dynamic_code_index_cpu(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit blockwise quantiser (csrc/cpu_ops.cpp): the value is snapped to a grid of
    65536 points over [-1, 1] and each grid point maps to its nearest code. Not always the nearest code
    of the value itself, so it is reproduced as is. A NaN (from a NaN or inf weight) gets index 0, as there."""
    lut_size = 65536
    is_nan = scaled.isnan()
    grid = (torch.where(is_nan, 0.0, scaled).clamp(-1.0, 1.0).add(1.0).mul(0.5).mul(float(lut_size - 1)).add(0.5)
            .to(torch.int64))
    grid_value = torch.arange(lut_size, dtype=torch.float32).mul(2.0).div(float(lut_size - 1)).add(-1.0)
    lut = torch.bucketize(grid_value, (code[:-1] + code[1:]) * 0.5)
    return torch.where(is_nan, 0, lut.to(scaled.device)[grid])


def _dynamic_code_index_cuda(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CUDA 8-bit blockwise quantiser (kernels.cu ``dQuantize``): seven halving steps of a
    binary search from index 127, then a midpoint test against the last bracket."""
    pivot = torch.full(scaled.shape, 127, dtype=torch.int64, device=scaled.device)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = -torch.ones_like(scaled), torch.ones_like(scaled)
    value = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = scaled > value
        lower_pivot, lower = torch.where(right, pivot, lower_pivot), torch.where(right, value, lower)
        upper_pivot, upper = torch.where(right, upper_pivot, pivot), torch.where(right, upper, value)
        pivot = torch.where(right, pivot + step, pivot - step)
        value = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = torch.where(scaled > (upper + value) * 0.5, upper_pivot, pivot)
    below = torch.where(scaled < (lower + value) * 0.5, lower_pivot, pivot)
    return torch.where(scaled > value, above, below)


@dataclass
class NF4Weight:
    """A 4-bit NormalFloat weight of logical shape ``(out_features, in_features)``.

    Attributes:
        packed: uint8 ``((numel + 1) // 2,)``, two 4-bit code indices per byte, high nibble first.
            When built by :meth:`from_bnb` this is a view of the bitsandbytes storage (no copy).
        absmax: fp32 ``(n_blocks,)`` per-block scales; or, when double-quantised, uint8
            ``(n_blocks,)`` indices into ``nested_code``.
        shape: the logical ``(out_features, in_features)``.
        dtype: the dtype dequantisation produces by default (the original weight's dtype).
        blocksize: elements per absmax block (bitsandbytes accepts 32..4096; 64 is the default).
        nested_code: fp32 ``(256,)`` dynamic code of the second level, or None.
        nested_absmax: fp32 ``(ceil(n_blocks / 256),)`` second-level scales, or None.
        nested_offset: fp32 0-d tensor on the weight's device (a float is accepted and converted), the
            mean subtracted from the absmaxes before the second level, or None. A tensor, never a Python
            float, so that viewing a bitsandbytes weight never syncs the device and the value traces
            under ``torch.compile`` (kernels load it).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_code: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_offset: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if len(self.shape) != 2:
            raise ValueError(f"NF4Weight shape must be (out_features, in_features), got {tuple(self.shape)}")
        if self.blocksize not in SUPPORTED_BLOCKSIZES:
            raise ValueError(f"unsupported NF4 blocksize {self.blocksize}; supported: {SUPPORTED_BLOCKSIZES}")
        if self.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"NF4Weight dtype must be one of {_FLOAT_DTYPES}, got {self.dtype}")
        if self.packed.dtype != torch.uint8 or self.packed.dim() != 1 or not self.packed.is_contiguous():
            raise TypeError(
                f"packed must be a contiguous 1-D uint8 tensor, got {self.packed.dtype} {tuple(self.packed.shape)}"
            )
        numel = self.shape.numel()
        if self.packed.numel() != (numel + 1) // 2:
            raise ValueError(f"packed has {self.packed.numel()} bytes; shape {tuple(self.shape)} needs {(numel + 1) // 2}")
        if self.absmax.numel() != self.n_blocks:
            raise ValueError(f"absmax has {self.absmax.numel()} entries; expected {self.n_blocks} blocks")
        nested = (self.nested_code, self.nested_absmax, self.nested_offset)
        if any(v is None for v in nested) and any(v is not None for v in nested):
            raise ValueError("nested_code, nested_absmax and nested_offset must be given together")
        if self.is_nested:
            if self.absmax.dtype != torch.uint8:
                raise TypeError(f"double-quantised absmax must be uint8, got {self.absmax.dtype}")
            if self.nested_code.numel() != 256 or self.nested_code.dtype != torch.float32:
                raise ValueError("nested_code must be 256 fp32 values")
            if self.nested_absmax.numel() != -(-self.n_blocks // NESTED_BLOCKSIZE):
                raise ValueError(
                    f"nested_absmax has {self.nested_absmax.numel()} entries; "
                    f"expected {-(-self.n_blocks // NESTED_BLOCKSIZE)}"
                )
            if isinstance(self.nested_offset, torch.Tensor):
                if self.nested_offset.dtype != torch.float32 or self.nested_offset.numel() != 1:
                    raise ValueError(f"nested_offset must be one fp32 value, got {self.nested_offset.dtype} "
                                     f"{tuple(self.nested_offset.shape)}")
                self.nested_offset = self.nested_offset.reshape(())
            else:
                self.nested_offset = torch.tensor(float(self.nested_offset), dtype=torch.float32, device=self.device)
        elif self.absmax.dtype != torch.float32:
            raise TypeError(f"absmax must be fp32, got {self.absmax.dtype}")
        devices = {t.device for t in self._tensors() if t is not None}
        if len(devices) != 1:
            raise ValueError(f"NF4Weight tensors are on different devices: {sorted(map(str, devices))}")

    def _tensors(self) -> tuple:
        return self.packed, self.absmax, self.nested_code, self.nested_absmax, self.nested_offset

    # ------------------------------------------------------------------ properties
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def n_blocks(self) -> int:
        return -(-self.shape.numel() // self.blocksize)

    @property
    def is_nested(self) -> bool:
        return self.nested_code is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight and its statistics (what a kernel has to read)."""
        return sum(t.numel() * t.element_size() for t in self._tensors() if t is not None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> "NF4Weight":
        """Quantise a float ``(out, in)`` weight exactly as ``bitsandbytes.functional.quantize_4bit``
        (``quant_type="nf4"``, ``compress_statistics=double_quant``) does on the weight's device.

        bitsandbytes' CPU and CUDA backends round the nested (8-bit) absmax level differently in rare
        near-tie cases (a 65536-point lookup table on CPU, a binary search on CUDA); both are reproduced,
        chosen by ``weight.device``. The 4-bit level is the nearest NF4 code on both.
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight))}")
        if weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"weight dtype must be one of {_FLOAT_DTYPES}, got {weight.dtype}")
        if blocksize not in SUPPORTED_BLOCKSIZES:
            raise ValueError(f"unsupported NF4 blocksize {blocksize}; supported: {SUPPORTED_BLOCKSIZES}")
        on_cpu = weight.device.type == "cpu"
        code = NF4_CODE.to(weight.device)
        scaled, absmax = _blockwise_scale(weight.detach().reshape(-1).float(), blocksize, divide_remainder=on_cpu)
        if scaled.numel() % 2:  # bitsandbytes pads the scaled values with 0.0 (the code index of 0)
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        idx = _nearest_code(scaled, code).to(torch.uint8)
        packed = (idx[0::2] << 4) | idx[1::2]
        nested = {}
        if double_quant:
            offset = absmax.mean()
            nested_code = dynamic_code().to(weight.device)
            scaled2, nested_absmax = _blockwise_scale(absmax - offset, NESTED_BLOCKSIZE, divide_remainder=False,
                                                      ignore_nan=on_cpu)
            if on_cpu:
                q = _dynamic_code_index_cpu(scaled2, nested_code)
                # bitsandbytes' CPU quantiser writes index 0 for an all-zero block
                q = torch.where(nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: q.numel()] == 0, 0, q)
            else:
                q = _dynamic_code_index_cuda(scaled2, nested_code)
            absmax = q.to(torch.uint8)
            nested = dict(nested_code=nested_code, nested_absmax=nested_absmax, nested_offset=offset)
        return cls(packed, absmax, weight.shape, weight.dtype, blocksize, **nested)

    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> "NF4Weight":
        """View a bitsandbytes ``Params4bit`` (or packed tensor + ``QuantState``) without copying.

        ``weight`` may be a ``bnb.nn.Params4bit``, a ``bnb.nn.Linear4bit`` (its ``.weight`` is used),
        or the packed tensor itself with ``quant_state`` given. A weight bitsandbytes has repacked for its CPU
        kernel is read from that layout into a new NF4Weight (see :meth:`_from_bnb_cpu_layout`).
        """
        if hasattr(weight, "weight") and not isinstance(weight, torch.Tensor):  # a Linear4bit
            weight = weight.weight
        quant_state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if quant_state is None:
            raise ValueError("no quant_state: the bitsandbytes weight is not quantised yet (move it to a device first)")
        if quant_state.quant_type != "nf4":
            raise ValueError(f"only NF4 is supported, got quant_type={quant_state.quant_type!r}")
        data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        if not data.is_contiguous():
            raise ValueError("the packed bitsandbytes weight must be contiguous")
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            # a view made in inference mode is an inference tensor, with no version counter (caches keyed on
            # the weight's version read it) and unusable by autograd later: view as outside it (dynamo traces
            # no inference-mode query; it compiles no_grad instead)
            with torch.inference_mode(False):
                return cls.from_bnb(weight, quant_state)
        if getattr(quant_state, "packing_format_for_cpu", False):
            return cls._from_bnb_cpu_layout(data, quant_state)
        packed = data.view(torch.uint8).reshape(-1)
        if quant_state.nested:
            state2 = quant_state.state2
            if state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested absmax blocksize {state2.blocksize} unsupported; bitsandbytes uses 256")
            nested = dict(nested_code=state2.code, nested_absmax=state2.absmax, nested_offset=quant_state.offset)
        else:
            nested = {}
        return cls(packed, quant_state.absmax, quant_state.shape, quant_state.dtype, quant_state.blocksize, **nested)

    @classmethod
    def _from_bnb_cpu_layout(cls, data: torch.Tensor, quant_state) -> "NF4Weight":
        """The weight a bitsandbytes 0.50 ``Linear4bit`` holds after repacking itself for its CPU kernel
        (``functional._convert_weight_packed_for_cpu``, which its eval-mode no-grad CPU forward runs where the
        CPU has AVX512-BF16), bit for bit: the same 4-bit codes in the NF4 layout (a copy, ``numel / 2`` bytes),
        and the absmax the repack left, which it rounded to bf16 (double quantisation resolved first), in fp32
        (exact). That is the weight bitsandbytes' kernel multiplies, and what its state now holds: the
        original absmax is gone.

        The repacked layout: ``data`` is ``(out, in / 2)`` bytes; rows in blocks of 32 and columns in pairs,
        each (row block, column pair) 32 bytes holding the block's 32 rows' pair of codes, rows 0-15 in the
        low nibbles and rows 16-31 in the high ones, each row's pair in two consecutive nibbles;
        ``quant_state.absmax`` is bf16 ``(in / blocksize, out)``, the row-major absmax transposed."""
        out_features, in_features = quant_state.shape
        block_rows = 32  # bitsandbytes' block_n for this layout (Linear4bit.forward uses its default)
        by_block = data.view(torch.uint8).reshape(out_features // block_rows, in_features // 2, block_rows)
        codes = torch.cat([by_block & 0xF, by_block >> 4], dim=-1)  # (row block, column pair, 32 rows x 2 codes)
        codes = codes.view(out_features // block_rows, in_features // 2, block_rows, 2).transpose(1, 2)
        codes = codes.reshape(-1)
        packed = (codes[0::2] << 4) | codes[1::2]
        absmax = quant_state.absmax.t().reshape(-1).float()
        dtype = getattr(quant_state, "original_dtype", quant_state.dtype)
        return cls(packed, absmax, quant_state.shape, dtype, quant_state.blocksize)

    def to_bnb_quant_state(self):
        """A ``bitsandbytes.functional.QuantState`` describing this weight (shares the tensors)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        offset = None
        if self.is_nested:
            state2 = QuantState(
                absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
            )
            offset = self.nested_offset
        return QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=NF4_CODE.to(self.device),
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=offset,
            state2=state2,
        )

    def to(self, device) -> "NF4Weight":
        """A copy on ``device`` (the same object if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self

        packed, absmax, code2, absmax2, offset = (None if t is None else t.to(device) for t in self._tensors())
        return NF4Weight(packed, absmax, self.shape, self.dtype, self.blocksize, code2, absmax2, offset)

    # ------------------------------------------------------------------ reference dequantisation
    def absmax_fp32(self) -> torch.Tensor:
        """The fp32 per-block absmax, rebuilt from the second level when double-quantised."""
        if not self.is_nested:
            return self.absmax
        n_blocks = self.absmax.numel()
        scale = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:n_blocks]
        return self.nested_code[self.absmax.long()] * scale + self.nested_offset

    def codes(self) -> torch.Tensor:
        """int64 ``(out, in)`` code indices, unpacked."""
        numel = self.shape.numel()
        pairs = torch.stack([self.packed >> 4, self.packed & 0xF], dim=1).reshape(-1)
        return pairs[:numel].long().view(self.shape)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float ``(out, in)`` weight, bit-exact with ``bitsandbytes.functional.dequantize_4bit``.

        ``dtype`` defaults to the weight's own dtype; float64 gives the exact fp32 values widened
        (the oracle in tests).
        """
        dtype = self.dtype if dtype is None else dtype
        values = NF4_CODE.to(self.device)[self.codes()].reshape(-1)
        numel = values.numel()
        absmax = self.absmax_fp32().repeat_interleave(self.blocksize)[:numel]
        return (values * absmax).view(self.shape).to(dtype)

    def __repr__(self) -> str:
        nested = ", double_quant" if self.is_nested else ""
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}{nested}, "
            f"device={self.device})"
        )


_thread_buffers = threading.local()  # per thread (threads run layers concurrently), freed with the thread


# A base weight as arguments of a ``torch.library`` op (an op takes tensors, numbers and dtypes, not objects): the
# schema fragment every fastpeft op with a weight declares, and the two conversions.
WEIGHT_OP_SCHEMA = ("Tensor? dense, Tensor? packed, Tensor? absmax, Tensor? nested_code, Tensor? nested_absmax, "
                    "Tensor? nested_offset, int out_features, int in_features, int blocksize, ScalarType weight_dtype")


def weight_op_args(weight: Union[torch.Tensor, NF4Weight]) -> tuple:
    """A dense ``(out, in)`` tensor or an :class:`NF4Weight` as the ten arguments of :data:`WEIGHT_OP_SCHEMA`:
    ``(dense, packed, absmax, nested_code, nested_absmax, nested_offset, out, in, blocksize, dtype)``, ``dense``
    None for an NF4 weight and the NF4 tensors None for a dense one."""
    if isinstance(weight, NF4Weight):
        return (None, weight.packed, weight.absmax, weight.nested_code, weight.nested_absmax, weight.nested_offset,
                weight.out_features, weight.in_features, weight.blocksize, weight.dtype)
    return (weight, None, None, None, None, None, weight.shape[0], weight.shape[1], 64, weight.dtype)


def weight_from_op_args(dense, packed, absmax, nested_code, nested_absmax, nested_offset, out_features, in_features,
                        blocksize, weight_dtype) -> Union[torch.Tensor, NF4Weight]:
    """The weight :func:`weight_op_args` flattened."""
    if dense is not None:
        return dense
    return NF4Weight(packed, absmax, (out_features, in_features), weight_dtype, blocksize, nested_code, nested_absmax,
                     nested_offset)


def dequant_buffers(device: torch.device) -> dict:
    """The reusable dequantisation buffers that :func:`dequant_buffer` hands out to the calling thread on
    ``device`` (on a GPU: on its current stream), by dtype. Per thread and per stream, so that no other
    thread's or stream's dequantisation can overwrite a buffer between this caller's write and its read."""
    by_place = getattr(_thread_buffers, "by_place", None)
    if by_place is None:
        by_place = _thread_buffers.by_place = {}
    streamless = device.type in ("cpu", "meta")  # meta: the static check's planning tensors
    place = device if streamless else (device, torch.get_device_module(device).current_stream(device))
    buffers = by_place.get(place)
    if buffers is None:
        buffers = by_place[place] = {}
    return buffers


def dequant_buffer(weight: Union[NF4Weight, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """A ``(out, in)`` view of the one reusable dequantisation buffer of ``weight.device`` and ``dtype`` (of the
    calling thread and stream, see :func:`dequant_buffers`), grown (never shrunk) to the largest layer seen
    (``weight`` an NF4 or a dense weight: only its shape and device count): a "dequantise then matmul"
    path holds one layer's dense weight at a time, as Unsloth's does, and allocates nothing per call. The view
    is overwritten by the next call, so it must be consumed before the next layer dequantises and never saved
    for backward. The buffer is a normal tensor whatever the autograd mode of the call that allocates it
    (inference mode included), so calls in any mode may write it."""
    buffers = dequant_buffers(weight.device)
    numel = weight.shape.numel()
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(dtype, None)  # free the smaller one before allocating
        with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
            buffer = buffers[dtype] = torch.empty(numel, dtype=dtype, device=weight.device)
    return buffer[:numel].view(weight.shape)
