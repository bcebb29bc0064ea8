"""Invariants on a random tiny config: cache decode, mixed batches, prefix layout."""
import torch
from hypothesis import given, settings, strategies as st

from chatglm.attention import DenseKVCache
from chatglm.config import ChatGLMConfig
from chatglm.prefix import PrefixKV, num_prefix_parameters, PrefixEncoder
from tests.tiny_model import tiny_config, tiny_model, tiny_prefix_encoder

CONFIG = tiny_config()
MODEL = tiny_model(CONFIG)
PREFIXES = {n: PrefixKV.from_encoder(tiny_prefix_encoder(CONFIG, n, n % 2 == 1, seed=n), CONFIG) for n in (3, 5, 8)}


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(3, 3000), min_size=2, max_size=12), st.sampled_from([None, 3, 5]), st.integers(1, 4))
def test_incremental_decode_equals_full_forward(ids, prefix_len, split):
    prefix = PREFIXES[prefix_len] if prefix_len else None
    split = min(split, len(ids) - 1)
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        full = MODEL(ids_t, prefix=prefix)  # [1, T, V]
        cache = DenseKVCache(CONFIG.num_layers)
        parts = [MODEL(ids_t[:, : len(ids) - split], prefix=prefix, cache=cache)]
        for t in range(len(ids) - split, len(ids)):
            parts.append(MODEL(ids_t[:, t: t + 1], cache=cache))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(3, 3000), min_size=1, max_size=10), st.sampled_from([None, 3, 5, 8])),
                min_size=2, max_size=4))
def test_mixed_batch_rows_equal_running_alone(rows):
    T = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r, _ in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r, _ in rows])
    prefixes = [PREFIXES[p] if p else None for _, p in rows]
    with torch.no_grad():
        batch = MODEL(ids, mask, prefix=prefixes)
        for b, (r, p) in enumerate(rows):
            alone = MODEL(torch.tensor([r]), prefix=PREFIXES[p] if p else None)
            assert torch.allclose(batch[b, T - len(r):], alone[0], atol=1e-4)


def test_prefix_flat_layout_is_thudms():
    # flat index ((2*layer + kv) * groups + group) * kv_channels + channel
    cfg = CONFIG
    flat = torch.arange(4 * cfg.kv_size, dtype=torch.float32).view(4, cfg.kv_size)
    kv = PrefixKV.from_flat(flat, cfg).kv  # [L, 2, P, G, D]
    L, G, D = cfg.num_layers, cfg.num_kv_groups, cfg.kv_channels
    for layer in range(L):
        for which in range(2):
            for g in range(G):
                idx = ((2 * layer + which) * G + g) * D
                assert torch.equal(kv[layer, which, 2, g], flat[2, idx: idx + D])


def test_prefix_parameter_counts_for_chatglm2_6b():
    cfg = ChatGLMConfig(multi_query_attention=True, multi_query_group_num=2)  # THUDM defaults = chatglm2-6b shape
    assert cfg.kv_size == 14336
    assert num_prefix_parameters(cfg, 128) == 1_835_008
    assert num_prefix_parameters(cfg, 128, prefix_projection=True) == 119_293_952
    with torch.device("meta"):
        assert sum(p.numel() for p in PrefixEncoder(cfg, 128).parameters()) == 1_835_008
        assert sum(p.numel() for p in PrefixEncoder(cfg, 128, True).parameters()) == 119_293_952


def test_trainable_prefix_gets_gradients_through_the_base():
    enc = tiny_prefix_encoder(CONFIG, 4)
    ids = torch.tensor([[5, 6, 7, 8]])
    loss = MODEL(ids, prefix=PrefixKV.from_encoder(enc, CONFIG)).logsumexp(-1).sum()
    loss.backward()
    assert enc.embedding.weight.grad is not None and enc.embedding.weight.grad.abs().sum() > 0


def test_low_precision_dtypes_run_and_agree():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        ref = MODEL(ids, prefix=PREFIXES[3])
        for dtype in (torch.bfloat16, torch.float16):
            low = tiny_model(CONFIG).to(dtype)
            out = low(ids, prefix=PREFIXES[3]).float()
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
            assert (out - ref).abs().max() < 0.1 * ref.abs().max()
