"""SlotAttention against a plain per-sequence softmax attention, in every decode layout."""
import math

import pytest
import torch

from server.slot_attention import DecodeLayout, SlotAttention

torch.set_num_threads(1)
L, SLOTS, CAP, G, D, HQ = 2, 12, 40, 2, 8, 4  # HQ query heads share each of the G groups


def reference(kv, layer, slot, ctx, q):
    """q [T, H, D] of the last T of `ctx` rows in `slot`: causal attention over rows [0, ctx)."""
    T = q.shape[0]
    k, v = kv[layer, 0, slot, :ctx], kv[layer, 1, slot, :ctx]  # [ctx, G, D]
    out = torch.empty_like(q)
    for t in range(T):
        visible = ctx - T + t + 1
        for h in range(G * HQ):
            g = h // HQ
            w = (k[:visible, g] @ q[t, h]) / math.sqrt(D)  # [visible]
            out[t, h] = w.softmax(0) @ v[:visible, g]
    return out


@pytest.mark.parametrize("decode_slots, layout", [
    ([0, 1, 2, 3], DecodeLayout.DENSE),
    ([1, 2, 4], DecodeLayout.RANGE),
    ([0, 11], DecodeLayout.GATHER),
    ([], DecodeLayout.DENSE),
])
def test_matches_reference(decode_slots, layout):
    torch.manual_seed(0)
    kv = torch.randn(L, 2, SLOTS, CAP, G, D)  # [L, 2, slots, capacity, G, D]
    lengths = {s: 5 + 3 * i for i, s in enumerate(decode_slots)}  # rows already there (prefix + tokens)
    prefill_slot, prefill_first, prefill_n = 7, 6, 4  # rows 6..9 of slot 7 computed now
    decode = [(s, lengths[s]) for s in decode_slots]
    attn = SlotAttention.build(kv, G * HQ, decode=decode, prefill=[(prefill_slot, prefill_first, prefill_n)])
    assert attn.layout is layout
    N = len(decode) + prefill_n
    q = torch.randn(N, G * HQ, D)
    k, v = torch.randn(N, G, D), torch.randn(N, G, D)
    for layer in range(L):
        out = attn(layer, q, k, v)  # writes k/v rows, then attends
        for i, (s, row) in enumerate(decode):
            assert torch.equal(kv[layer, 0, s, row], k[i]) and torch.equal(kv[layer, 1, s, row], v[i])
            torch.testing.assert_close(out[i:i + 1], reference(kv, layer, s, row + 1, q[i:i + 1]))
        p = slice(len(decode), N)
        ctx = prefill_first + prefill_n
        torch.testing.assert_close(out[p], reference(kv, layer, prefill_slot, ctx, q[p]))
