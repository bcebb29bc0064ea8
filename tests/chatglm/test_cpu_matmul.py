"""chatglm/cpu_matmul.py: the blocked fp32 path of half-precision linears equals F.linear up to rounding."""
import pytest
import torch
import torch.nn.functional as F

from chatglm import cpu_matmul
from chatglm.cpu_matmul import Linear, blocked_fp32_linear, wants_fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64), (700, 64)])
def test_blocked_matches_fp32_reference(dtype, shape, monkeypatch):
    monkeypatch.setattr(cpu_matmul, "BLOCK_BYTES", 64 * 4 * 16)  # 16-row blocks: several blocks and a tail
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 64, generator=g).to(dtype)
    b = torch.randn(100, generator=g).to(dtype)
    x = torch.randn(*shape, generator=g).to(dtype)
    y = blocked_fp32_linear(x, w, b)
    ref = F.linear(x.float(), w.float(), b.float()).to(dtype)
    assert y.shape == ref.shape and y.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y, ref)  # one rounding of an fp32 result: equal up to an ulp


def test_linear_paths(monkeypatch):
    layer = Linear(64, 32).to(torch.bfloat16)
    monkeypatch.setattr(cpu_matmul, "native_half_gemm", lambda dtype: False)
    one, many = torch.randn(1, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    assert not wants_fp32(one, layer.weight) and wants_fp32(many, layer.weight)
    assert not wants_fp32(many.float(), layer.weight.float())  # fp32 weights: plain F.linear
    with torch.no_grad():
        torch.testing.assert_close(layer(many), F.linear(many, layer.weight, layer.bias), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(layer(one), F.linear(one, layer.weight, layer.bias), atol=0, rtol=0)
    monkeypatch.setattr(cpu_matmul, "UPCAST_MIN_ROWS", 0)
    assert not wants_fp32(many, layer.weight)


def test_linear_keeps_autograd():
    layer = Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("native", [True, False])
def test_half_weight_under_fp32_activations(dtype, native, monkeypatch):
    """A half-precision weight (a server's output layer) multiplies fp32 activations exactly widened."""
    if not native:
        monkeypatch.setattr(cpu_matmul, "native_unavailable_reason", lambda: "off for this test")
    layer = Linear(64, 32, bias=False).to(dtype)
    ref = Linear(64, 32, bias=False)
    ref.weight.data = layer.weight.data.float()
    with torch.no_grad():
        for rows in (1, 3, 8, 30):
            x = torch.randn(rows, 64)
            y = layer(x)
            assert y.dtype == torch.float32
            torch.testing.assert_close(y, F.linear(x, ref.weight), rtol=1e-5, atol=1e-5)
            if rows <= cpu_matmul.GEMV_MAX_ROWS and native and dtype == torch.float16:
                assert torch.equal(y, ref(x))  # fp16 takes the fp32 kernel's order: same bits
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()  # under autograd the weight is widened for F.linear
    assert x.grad is not None
