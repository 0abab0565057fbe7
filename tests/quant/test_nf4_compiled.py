"""lorakit.fast.nf4_compiled: the compiled NF4 decode against its reference, formats.nf4_blocks, bit for bit.

``fused_blocks`` (the formulation torch.compile takes) is checked eagerly on many shapes; the compiled path on
weights of real size (it only runs from MIN_ELEMENTS on), in both dtypes, both scale formats and a row chunk whose
blocks start mid-weight; the gate, the fallback when the compiler fails, and the fallback when a compiled result
differs; a QuantLinear's forward and input gradient with and without it.
"""

from __future__ import annotations

import pytest
import torch

from lorakit.quant import formats, nf4_compiled
from lorakit.quant.linear import QuantLinear


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module's per-process state (compiled function, failure flag, checked kinds) reset, and restored after."""
    monkeypatch.setattr(nf4_compiled, "_compiled", None)
    monkeypatch.setattr(nf4_compiled, "_failed", False)
    monkeypatch.setattr(nf4_compiled, "_checked", {})
    monkeypatch.delenv("LORAKIT_COMPILE", raising=False)


def _inputs(q: formats.NF4Tensor, b0: int = 0, b1: int | None = None) -> tuple:
    """nf4_blocks' tensors for blocks b0:b1 of ``q``."""
    b1 = q.packed.numel() * 2 // q.block_size if b1 is None else b1
    packed = q.packed[b0 * q.block_size // 2 : b1 * q.block_size // 2]
    if q.absmax is not None:
        return packed, q.absmax[b0:b1], None, None, None
    return packed, None, q.absmax_codes[b0:b1], q.absmax_step, q.absmax_offset


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 64), (33, 70), (300, 257), (2, 3, 128)])
def test_the_fused_formulation_equals_the_eager_decode_bit_for_bit(shape, dtype, double_quant):
    torch.manual_seed(0)
    q = formats.quantize_nf4(torch.randn(shape) * 0.05, double_quant=double_quant)
    blocks = q.packed.numel() * 2 // q.block_size
    for b0, b1 in ((0, blocks), (blocks // 3, blocks), (1, max(2, blocks // 2))):  # scales starting mid-weight
        args = _inputs(q, b0, b1)
        fused = nf4_compiled.fused_blocks(*args, first=b0, block_size=q.block_size, dtype=dtype)
        eager = formats.nf4_blocks(*args, first=b0, block_size=q.block_size, dtype=dtype)
        assert fused.dtype == eager.dtype == dtype
        assert torch.equal(fused, eager)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_compiled_decode_equals_the_eager_one_on_real_sizes(fresh, device, dtype, double_quant):
    torch.manual_seed(0)
    q = formats.quantize_nf4(torch.randn(512, 192, device=device) * 0.02, double_quant=double_quant)
    assert nf4_compiled.decoder(512 * 192, q.packed.device) is nf4_compiled.decode_blocks
    full = formats.dequantize_nf4(q, dtype=dtype, decode=nf4_compiled.decode_blocks)
    assert torch.equal(full, formats.dequantize_nf4(q, dtype=dtype))
    rows = formats.dequantize_nf4(q, 37, 500, dtype=dtype, decode=nf4_compiled.decode_blocks)  # blocks from mid-weight
    assert torch.equal(rows, formats.dequantize_nf4(q, 37, 500, dtype=dtype))
    assert nf4_compiled._checked and all(nf4_compiled._checked.values())  # each kind was compared, and equal
    assert nf4_compiled._compiled is not None and not nf4_compiled._failed


def test_the_gate_keeps_small_weights_other_devices_and_opt_outs_eager(fresh, monkeypatch):
    cpu = torch.device("cpu")
    assert nf4_compiled.decoder(nf4_compiled.MIN_ELEMENTS, cpu) is nf4_compiled.decode_blocks
    assert nf4_compiled.decoder(nf4_compiled.MIN_ELEMENTS - 1, cpu) is None  # tiny models: no compile
    assert nf4_compiled.decoder(1 << 20, torch.device("meta")) is None
    monkeypatch.setenv("LORAKIT_COMPILE", "0")
    assert nf4_compiled.decoder(1 << 20, cpu) is None
    monkeypatch.setenv("LORAKIT_COMPILE", "1")
    monkeypatch.setattr(nf4_compiled, "_failed", True)
    assert nf4_compiled.decoder(1 << 20, cpu) is None


def test_a_failing_compiler_warns_once_and_decodes_eagerly(fresh, monkeypatch):
    def broken(fn, **kwargs):
        def call(*args, **options):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    q = formats.quantize_nf4(torch.randn(256, 256) * 0.02)
    with pytest.warns(UserWarning, match="decoded eagerly.*no C.. compiler.*LORAKIT_COMPILE=0"):
        out = formats.dequantize_nf4(q, dtype=torch.bfloat16, decode=nf4_compiled.decode_blocks)
    assert torch.equal(out, formats.dequantize_nf4(q, dtype=torch.bfloat16))
    assert nf4_compiled._failed and nf4_compiled.decoder(1 << 20, torch.device("cpu")) is None


def test_a_compiled_result_that_differs_is_not_used(fresh, monkeypatch):
    monkeypatch.setattr(nf4_compiled, "_compiled", lambda *args, **options: formats.nf4_blocks(*args, **options) + 1)
    q = formats.quantize_nf4(torch.randn(256, 256) * 0.02)
    reference = formats.dequantize_nf4(q)
    for _ in range(2):  # the first call compares and returns the reference; later calls run eager for that kind
        assert torch.equal(formats.dequantize_nf4(q, decode=nf4_compiled.decode_blocks), reference)
    assert list(nf4_compiled._checked.values()) == [False]


@pytest.mark.parametrize("autocast", [False, True])
def test_a_quant_linear_computes_the_same_with_and_without_the_compiled_decode(fresh, monkeypatch, autocast):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(384, 256), bits=4)  # 98304 weights: compiled
    x = torch.randn(3, 5, 384)
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv("LORAKIT_COMPILE", setting)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(xi)
        y.float().square().sum().backward()
        results.append((y.detach(), xi.grad))
    assert nf4_compiled._compiled is not None and all(nf4_compiled._checked.values())  # the first run was compiled
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
