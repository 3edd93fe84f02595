"""Block-sparse execution: every fast path equals the dense-masked reference; decode with a KV
cache sees exactly its layout row; the 13B configuration's layer and block counts."""
import json
from pathlib import Path

import pytest
import torch

from megatron_ru import ConfigError, GPTModel, ModelConfig
from megatron_ru.model.sparse_attention import BlockSparseAttention, expand_layout
from megatron_ru.model.sparsity import causal_block_count, causal_density, make_layout
from megatron_ru.training.metrics import attention_fraction
from tests.helpers import assert_rel_close

ROOT = Path(__file__).resolve().parents[2]

LAYOUTS = {
    "fixed_uni": dict(mode="fixed", block=4, num_local_blocks=4, num_global_blocks=1,
                      attention="unidirectional", different_layout_per_head=True,
                      num_different_global_patterns=4),
    "fixed_bi_horizontal": dict(mode="fixed", block=4, num_local_blocks=2, num_global_blocks=1,
                                attention="bidirectional", horizontal_global_attention=True),
    "bigbird": dict(mode="bigbird", block=4, num_random_blocks=1, num_sliding_window_blocks=3,
                    num_global_blocks=1, different_layout_per_head=True),
    "bslongformer": dict(mode="bslongformer", block=4, num_sliding_window_blocks=3,
                         global_block_indices=[0, 5]),
    "variable": dict(mode="variable", block=4, num_random_blocks=1, local_window_blocks=[2, 3],
                     global_block_indices=[1], attention="unidirectional",
                     different_layout_per_head=True),
}


def qkv(b, h, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, dtype=torch.float64).float().requires_grad_()
            for _ in range(3)]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("seq", [64, 37, 5])
def test_gather_equals_reference_forward_backward(name, seq):
    layout = make_layout(LAYOUTS[name], num_heads=4, seq_length=64)
    outs = {}
    for impl in ("reference", "gather"):
        attn = BlockSparseAttention(layout, 4, impl=impl)
        q, k, v = qkv(2, 4, seq, 8, seed=seq)
        out = attn(q, k, v)
        out.backward(torch.ones_like(out) + out.detach())  # a non-trivial upstream gradient
        outs[impl] = (out.detach(), q.grad, k.grad, v.grad)
    for what, a, r in zip(("out", "dq", "dk", "dv"), outs["gather"], outs["reference"]):
        assert_rel_close(a, r, 1e-5, f"{name} seq={seq} {what}")


def test_reference_is_the_definition():
    """Softmax over exactly the keys the causal layout keeps, written out by hand."""
    layout = make_layout(LAYOUTS["fixed_uni"], num_heads=4, seq_length=32)
    q, k, v = (t.detach() for t in qkv(1, 4, 32, 8, seed=1))
    out = BlockSparseAttention(layout, 4, impl="reference")(q, k, v)
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    mask = expand_layout(layout, 4, 32)
    manual = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    assert_rel_close(out, manual, 1e-5, "reference")
    assert not mask[0].all() and mask[0].tril().sum() < mask.new_ones(32, 32).tril().sum()


def test_gather_with_gqa_heads():
    layout = make_layout(LAYOUTS["fixed_uni"], num_heads=4, seq_length=32)
    q = qkv(1, 4, 30, 8, seed=2)[0]
    k, v = qkv(1, 2, 30, 8, seed=3)[:2]
    ref = BlockSparseAttention(layout, 4, impl="reference")(q, k, v)
    out = BlockSparseAttention(layout, 4, impl="gather")(q, k, v)
    assert_rel_close(out, ref, 1e-5, "gqa")


def test_flex_equals_reference_on_cpu_inference():
    pytest.importorskip("torch.nn.attention.flex_attention")
    layout = make_layout(LAYOUTS["fixed_uni"], num_heads=4, seq_length=256)
    q, k, v = (t.detach() for t in qkv(1, 4, 200, 16, seed=4))
    ref = BlockSparseAttention(layout, 4, impl="reference")(q, k, v)
    with torch.no_grad():
        out = BlockSparseAttention(layout, 4, impl="flex")(q, k, v)
    assert_rel_close(out, ref, 1e-5, "flex")


def test_too_long_and_bad_layouts_are_clear():
    layout = make_layout(LAYOUTS["fixed_uni"], num_heads=4, seq_length=32)
    attn = BlockSparseAttention(layout, 4)
    q, k, v = (t.detach() for t in qkv(1, 4, 33, 8, seed=5))
    with pytest.raises(ValueError, match="33 tokens exceeds the block-sparse layout's maximum of 32"):
        attn(q, k, v)
    broken = layout.clone()
    broken[1, 3, 3] = 0
    with pytest.raises(ValueError, match="head 1 block row 3 does not keep its own diagonal block"):
        BlockSparseAttention(broken, 4)
    with pytest.raises(ValueError, match="impl 'triton' is unknown"):
        BlockSparseAttention(layout, 4, impl="triton")
    with pytest.raises(ConfigError, match="sparse_attention: .*mode"):
        ModelConfig(sparse_attention={"mode": "strided"})


def sparse_model(preset, impl, **kw):
    cfg = ModelConfig.from_preset(preset, max_position_embeddings=64, sparse_mode="alternating",
                                  sparse_attention=LAYOUTS["fixed_uni"], sparse_impl=impl, **kw)
    return GPTModel(cfg, seed=3).eval()


@pytest.mark.parametrize("preset", ["tiny-gpt3", "tiny-llama"])
def test_model_paths_agree_and_sparse_differs_from_dense(preset):
    tokens = torch.randint(0, 1000, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = sparse_model(preset, "reference")(tokens)
        fast = sparse_model(preset, "gather")(tokens)
        dense = GPTModel(ModelConfig.from_preset(preset, max_position_embeddings=64), seed=3).eval()(tokens)
    assert_rel_close(fast, ref, 1e-5, "model gather vs reference")
    assert (ref[:, 20:] - dense[:, 20:]).abs().max() > 1e-4  # the layout really drops keys
    assert torch.equal(ref[:, :16], dense[:, :16])  # the first local window is fully causal


@pytest.mark.parametrize("preset", ["tiny-gpt3", "tiny-llama"])
def test_cached_decode_through_sparse_layers_equals_full_recompute(preset):
    model = sparse_model(preset, "gather")
    tokens = torch.randint(0, 1000, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(batch_size=2, max_length=64)
        steps = [model(tokens[:, :21], cache=cache), model(tokens[:, 21:27], cache=cache)]
        steps += [model(tokens[:, t:t + 1], cache=cache) for t in range(27, 50)]
    assert_rel_close(torch.cat(steps, 1), full, 1e-5, "sparse cached decode")


def test_per_row_positions_in_cache():
    """Rows at different positions (prompts of different lengths) decode like each row alone."""
    model = sparse_model("tiny-gpt3", "gather")
    a = torch.randint(0, 1000, (1, 30), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 1000, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        cache = model.new_cache(batch_size=2, max_length=64)
        prompt = torch.cat([a[:, :20], b[:, :20]])  # row 1 uses only its first 12 tokens
        model(prompt, cache=cache)
        pos = torch.tensor([[20], [12]])
        out = []
        for step in range(8):
            nxt = torch.cat([a[:, 20 + step:21 + step], b[:, 12 + step:13 + step]])
            out.append(model(nxt, positions=pos + step, cache=cache))
    out = torch.cat(out, 1)
    assert_rel_close(out[0], full_a[0, 20:28], 1e-5, "row 0")
    assert_rel_close(out[1], full_b[0, 12:20], 1e-5, "row 1")


def test_13b_config_layers_and_blocks():
    ds = json.loads((ROOT / "configs" / "gpt3_13b_sparse.json").read_text())
    cfg = ModelConfig.from_preset("rugpt3-13b", sparse_attention=ds["sparse_attention"])
    assert sum(cfg.sparse_layers()) == 20 and cfg.sparse_layers()[:4] == [True, False, True, False]
    with torch.device("meta"):
        model = GPTModel(cfg)
    sparse = [b.attn.sparse is not None for b in model.blocks]
    assert sparse == cfg.sparse_layers()
    layout = make_layout(ds["sparse_attention"], num_heads=40, seq_length=2048)
    assert causal_block_count(layout).tolist() == [1536] * 40
    # 2048 / 16 = 128 block rows: dense causal attention computes 128 * 129 / 2 = 8256 blocks
    assert causal_density(layout) == pytest.approx(1536 / 8256)
    # the FLOP count's attention factor (training/metrics.py): 20 sparse layers at that density, 20 dense
    assert attention_fraction(cfg, 2048) == pytest.approx((20 * 1536 / 8256 + 20) / 40)
