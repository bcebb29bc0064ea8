"""The C++ inference ops (chatglm/fused_cpu.cpp, gemv_cpu.cpp, block_cpu.cpp) against the eager code they replace,
and the huge-page move."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from chatglm import fused_ops
from chatglm.huge_pages import move_to_huge_pages
from chatglm.model import RMSNorm, apply_rotary
from chatglm.native import native_unavailable_reason

REASON = native_unavailable_reason()
if REASON is not None and os.environ.get("CI"):  # CI has a compiler: a failed build must not pass as a skip
    pytest.fail(f"C++ extension unavailable in CI: {REASON}", pytrace=False)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"C++ extension unavailable (no compiler?): {REASON}")

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    H, G, D, T = 4, 2, 16, 5
    qkv = torch.randn(T, (H + 2 * G) * D, generator=g).to(dtype)
    angles = torch.rand(T, D // 4, generator=g) * 20
    rope = torch.stack([angles.cos(), angles.sin()], -1)  # [T, R/2, 2], R = D/2
    q, k, v = qkv.split([H * D, G * D, G * D], -1)
    want_q = apply_rotary(q.unflatten(-1, (H, D)), rope).flatten(-2)
    want_k = apply_rotary(k.unflatten(-1, (G, D)), rope).flatten(-2)
    got = fused_ops.rotary_(qkv.clone(), rope, H + G, D)
    gq, gk, gv = got.split([H * D, G * D, G * D], -1)
    assert torch.equal(gq, want_q) and torch.equal(gk, want_k) and torch.equal(gv, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_eager(dtype, monkeypatch):
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(300, 1e-5).to(dtype)
    norm.weight.data = torch.randn(300, generator=g).to(dtype)
    x = (torch.randn(3, 7, 300, generator=g) * 4).to(dtype)
    got = fused_ops.rms_norm(x, norm.weight, norm.eps)
    monkeypatch.setenv("CHATGLM_FUSED", "0")
    fused_ops.fused_available.cache_clear()
    try:
        with torch.no_grad():
            want = norm(x)
    finally:
        fused_ops.fused_available.cache_clear()
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # only the order of the fp32 sum differs
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_eager(dtype):
    h = (torch.randn(4, 2 * 33, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    gate, up = h.chunk(2, -1)
    want = F.silu(gate) * up
    got = fused_ops.swiglu(h)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_writes_kv_and_matches_sdpa(dtype):
    g = torch.Generator().manual_seed(3)
    S, C, G, D, H = 4, 12, 2, 8, 6
    k_cache = torch.randn(S, C, G, D, generator=g).to(dtype)
    v_cache = torch.randn(S, C, G, D, generator=g).to(dtype)
    slots, rows = torch.tensor([2, 0, 3]), torch.tensor([5, 0, 11])
    qkv = torch.randn(3, (H + 2 * G) * D, generator=g).to(dtype)  # strided q/k/v views, as the model passes
    q, k, v = (t.unflatten(-1, (n, D)) for t, n in zip(qkv.split([H * D, G * D, G * D], -1), (H, G, G)))
    kc, vc = k_cache.clone(), v_cache.clone()
    out = fused_ops.decode_attention_(kc, vc, q, k, v, slots, rows)
    k_cache[slots, rows], v_cache[slots, rows] = k, v
    assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache)
    for i in range(3):
        s, n = int(slots[i]), int(rows[i]) + 1
        want = F.scaled_dot_product_attention(q[i].float().view(G, H // G, D), k_cache[s, :n].float().transpose(0, 1),
                                              v_cache[s, :n].float().transpose(0, 1)).reshape(H, D)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[i].float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16, 24, 64])
@pytest.mark.parametrize("n,k", [(1, 1), (10, 17), (70, 260)])
def test_gemv_matches_linear_and_single_rows(wdtype, rows, n, k):
    """Decode steps, batched or not: F.linear's values, and each row's bits are those it gets alone."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(n, k, generator=g).to(wdtype)
    b = torch.randn(n, generator=g)
    for xdtype in DTYPES:
        x = torch.randn(rows, k, generator=g).to(xdtype)
        got = torch.ops.chatglm_gemv.mv(x, w, b)
        assert got.dtype == xdtype and got.shape == (rows, n)
        tol = 1e-4 if xdtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), F.linear(x.float(), w.float(), b), rtol=tol, atol=tol * k ** 0.5)
        alone = torch.cat([torch.ops.chatglm_gemv.mv(x[i:i + 1], w, b) for i in range(rows)])
        assert torch.equal(got, alone)


def test_gemv_row_limit_is_checked():
    with pytest.raises(RuntimeError, match="1 to 64 activation rows"):
        torch.ops.chatglm_gemv.mv(torch.randn(65, 8), torch.randn(5, 8).bfloat16(), None)


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("n,k", [(1, 1), (9, 17), (70, 260)])
def test_gemv_fp16_weights_give_the_bits_of_fp32_weights(rows, n, k):
    g = torch.Generator().manual_seed(5)
    w16 = torch.randn(n, k, generator=g).half()
    x = torch.randn(rows, k, generator=g)
    b = torch.randn(n, generator=g)
    got = torch.ops.chatglm_gemv.mv(x, w16, b)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.ops.chatglm_gemv.mv(x, w16.float(), b))  # widening is exact


def test_move_to_huge_pages_keeps_values_and_parameters():
    lin = torch.nn.Linear(512, 1024).bfloat16()  # 1 MiB weight: moved; bias: stays
    param = lin.weight
    before = lin.weight.detach().clone()
    moved = move_to_huge_pages(lin, min_bytes=1 << 20)
    assert lin.weight is param and torch.equal(lin.weight, before)
    assert moved in (0, 1 << 20)  # 0 where the OS has no transparent huge pages
    x = torch.randn(2, 512).bfloat16()
    torch.testing.assert_close(lin(x), F.linear(x, before, lin.bias))


@pytest.mark.parametrize("quantize", [None, 8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_ops_give_the_bits_of_the_eager_block(fixture_dir, monkeypatch, quantize, dtype):
    """chatglm_block::pre/post (a layer in two C++ calls around attention) against the same kernels
    called one by one from Python: prefill and decode steps, float (GEMV) and int8/int4 (AVX2) weights."""
    import chatglm
    from chatglm.generation import generate
    from chatglm.model import GLMBlock

    model = chatglm.load_model(fixture_dir / "model", dtype=dtype, quantize=quantize)
    ids = torch.tensor([[3001, 3003, 283, 288, 2703, 2731, 2740, 13, 13, 2729, 2724, 777, 13, 13]])
    used = []
    fused_specs = GLMBlock._fused_specs

    def spy(self, x, rope):
        specs = fused_specs(self, x, rope)
        used.append(specs is not None)
        return specs

    monkeypatch.setattr(GLMBlock, "_fused_specs", spy)
    with torch.no_grad():
        fused = model(ids), generate(model, ids, max_new_tokens=8)
    assert used and all(used)
    monkeypatch.setattr(GLMBlock, "_fused_specs", lambda self, x, rope: None)
    with torch.no_grad():
        eager = model(ids), generate(model, ids, max_new_tokens=8)
    assert torch.equal(fused[0], eager[0])
    assert fused[1] == eager[1]
