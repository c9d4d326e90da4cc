"""NF4Weight against bitsandbytes: quantisation, zero-copy wrapping, dequantisation, bit for bit."""

import pytest
import torch

from fastpeft.nf4 import NF4_CODE, NF4Weight, dynamic_code

bnb_f = pytest.importorskip("bitsandbytes.functional")

# (out, in): odd element counts, block counts not a multiple of 256, and > 256 blocks (nested level 2)
SHAPES = [(37, 128), (300, 512), (3, 4096), (129, 256)]


def _bnb_quantize(w, blocksize, double_quant):
    return bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def test_codes_match_bitsandbytes():
    assert torch.equal(NF4_CODE, bnb_f.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnb_f.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(37, 53), (1, 7)])
def test_quantize_matches_bitsandbytes(shape, dtype, blocksize, double_quant):
    w = (torch.randn(shape) * 0.05).to(dtype)
    packed, state = _bnb_quantize(w, blocksize, double_quant)
    ours = NF4Weight.quantize(w, blocksize, double_quant)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert ours.shape == state.shape and ours.dtype == state.dtype
    if double_quant:
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_code, state.state2.code)
        assert ours.nested_offset.dtype == torch.float32 and torch.equal(ours.nested_offset, state.offset)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_from_bnb_is_a_view_and_dequantizes_bit_exact(shape, dtype, blocksize, double_quant):
    w = torch.randn(shape).to(dtype)
    packed, state = _bnb_quantize(w, blocksize, double_quant)
    view = NF4Weight.from_bnb(packed, state)
    assert view.packed.data_ptr() == packed.data_ptr(), "from_bnb must not copy the packed weight"
    assert view.absmax.data_ptr() == state.absmax.data_ptr()
    if double_quant:  # the offset stays bnb's device tensor: no .item(), no device sync per forward
        assert view.nested_offset.data_ptr() == state.offset.data_ptr()
    expected = bnb_f.dequantize_4bit(packed, state)
    assert torch.equal(view.dequantize(), expected)
    if dtype == torch.float32:  # float64 is the fp32 values widened exactly: the oracle of kernel tests
        assert torch.equal(view.dequantize(torch.float64), expected.double())


@pytest.mark.parametrize("double_quant", [False, True])
def test_blocks_spanning_rows_follow_the_flat_format(double_quant):
    # blocksize > in_features: blocks span rows. bitsandbytes' CPU dequantiser is wrong for this shape
    # (0.50.2), but right for a single row, and the format is defined on the flattened weight.
    w = torch.randn(19, 32)
    packed, state = _bnb_quantize(w, 128, double_quant)
    ours = NF4Weight.from_bnb(packed, state).dequantize()
    state.shape = torch.Size((1, w.numel()))
    flat = bnb_f.dequantize_4bit(packed, state)
    assert torch.equal(ours.reshape(1, -1), flat)


def test_to_bnb_quant_state_round_trips():
    w = torch.randn(40, 256)
    ours = NF4Weight.quantize(w, 64, double_quant=True)
    state = ours.to_bnb_quant_state()
    assert torch.equal(bnb_f.dequantize_4bit(ours.packed.view(-1, 1), state), ours.dequantize())


def test_from_bnb_linear4bit(tiny_llama_4bit):
    layer = tiny_llama_4bit.model.layers[0].mlp.down_proj
    view = NF4Weight.from_bnb(layer)
    assert view.is_nested and view.shape == (64, 128)
    assert view.packed.data_ptr() == layer.weight.data_ptr()
    assert torch.equal(view.dequantize(), bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state))


def test_quantisation_error_is_bounded():
    w = torch.randn(64, 256)
    err = (NF4Weight.quantize(w, 64).dequantize() - w).abs()
    # nearest-code rounding: the error is at most half the widest gap between adjacent codes, times absmax
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    assert (err.view(-1, 64) <= absmax * half_gap * (1 + 1e-6)).all()
    assert err.max() > 0  # the check above is not vacuous


def test_bad_inputs_raise_before_work():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="unsupported NF4 blocksize 100"):
        NF4Weight.quantize(w, 100)
    with pytest.raises(ValueError, match="2-D"):
        NF4Weight.quantize(torch.randn(64), 64)
    with pytest.raises(TypeError, match="dtype"):
        NF4Weight.quantize(w.to(torch.int32), 64)
    good = NF4Weight.quantize(w, 64)
    with pytest.raises(ValueError, match="packed has 3 bytes"):
        NF4Weight(good.packed[:3], good.absmax, good.shape, good.dtype, 64)
    with pytest.raises(ValueError, match="absmax has 3 entries"):
        NF4Weight(good.packed, torch.ones(3), good.shape, good.dtype, 64)
    with pytest.raises(ValueError, match="given together"):
        NF4Weight(good.packed, good.absmax, good.shape, good.dtype, 64, nested_code=dynamic_code())
    nested = NF4Weight.quantize(w, 64, double_quant=True)
    with pytest.raises(ValueError, match="nested_offset must be one fp32 value"):
        NF4Weight(nested.packed, nested.absmax, nested.shape, nested.dtype, 64, nested.nested_code,
                  nested.nested_absmax, torch.zeros(2))
    with pytest.raises(ValueError, match="different devices"):
        NF4Weight(nested.packed, nested.absmax, nested.shape, nested.dtype, 64, nested.nested_code,
                  nested.nested_absmax, torch.zeros((), device="meta"))
    packed, state = bnb_f.quantize_4bit(w, quant_type="fp4")
    with pytest.raises(ValueError, match="only NF4"):
        NF4Weight.from_bnb(packed, state)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((64, 128), 64), ((96, 256), 32), ((32, 64), 64)])
def test_from_bnb_reads_a_layer_bitsandbytes_repacked_for_its_cpu_kernel(bnb_cpu_kernel_on, shape, blocksize,
                                                                          double_quant):
    """bitsandbytes' eval-mode no-grad CPU forward (its AVX512-BF16 check forced on) repacks a Linear4bit in place
    for its own kernel: the same codes in another order, the absmax rounded to bf16. The view of the repacked
    layer holds exactly those codes and that absmax, in the NF4 layout."""
    bnb = pytest.importorskip("bitsandbytes")
    out_features, in_features = shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(shape), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, blocksize=blocksize).to("cpu")
    before = NF4Weight.from_bnb(layer)
    codes, absmax = before.codes().clone(), before.absmax_fp32().clone()
    with torch.no_grad():
        layer.eval()(torch.randn(2, in_features))
    assert layer.weight.quant_state.packing_format_for_cpu
    view = NF4Weight.from_bnb(layer)
    assert not view.is_nested and view.dtype == torch.float32 and view.blocksize == blocksize
    assert torch.equal(view.codes(), codes)
    assert torch.equal(view.absmax, absmax.to(torch.bfloat16).float())
    rounded = absmax.to(torch.bfloat16).float().repeat_interleave(blocksize).view(shape)
    assert torch.equal(view.dequantize(torch.float32), NF4_CODE[codes] * rounded)  # fp32 products, as bitsandbytes


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_with_nan_or_inf_entries_matches_bitsandbytes(bad, double_quant):
    """A NaN / inf weight entry quantises as bitsandbytes quantises it (a NaN or inf absmax; double quantised, a
    NaN or inf offset and every block NaN), not an IndexError; several blocks, one nested block partly filled."""
    w = torch.randn(40, 96) * 0.05
    w[3, 10] = bad
    w[7, 0] = float("nan")
    packed, state = _bnb_quantize(w, 64, double_quant)
    ours = NF4Weight.quantize(w, 64, double_quant)
    assert torch.equal(ours.packed, packed.view(-1))
    torch.testing.assert_close(ours.absmax, state.absmax, rtol=0, atol=0, equal_nan=True)
    if double_quant:  # (bitsandbytes' CPU dequantize_4bit of a single NaN absmax is not blockwise: not compared)
        torch.testing.assert_close(ours.nested_absmax, state.state2.absmax, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(ours.nested_offset, state.offset, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(ours.dequantize(), bnb_f.dequantize_4bit(packed, state), rtol=0, atol=0,
                                   equal_nan=True)
