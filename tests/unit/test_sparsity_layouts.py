"""Block-sparse layouts match DeepSpeed's sparsity configs on hand-derived examples; sparse-layer choice; errors."""

import warnings

import pytest
import torch

from megatron_ru.model.sparsity import (
    SparsityConfigError, causal_block_count, causal_block_total, causal_density, is_sparse_layer, layout_for_tp_rank,
    layout_to_mask, make_layout, normalize_sparse_attention, sparse_layer_indices, split_heads,
)

UNI, BI = "unidirectional", "bidirectional"
RUGPT3_13B = {"mode": "fixed", "block": 16, "different_layout_per_head": True, "num_local_blocks": 8,
              "num_global_blocks": 1, "attention": "unidirectional", "horizontal_global_attention": False,
              "num_different_global_patterns": 8}


def M(*rows: str) -> torch.Tensor:
    """A literal block matrix, one string of 0/1 per block row."""
    return torch.tensor([[int(c) for c in row] for row in rows], dtype=torch.int64)


def layout(mode: str, nb: int, heads: int = 1, **keys) -> torch.Tensor:
    """Layout with block 16 over nb blocks (seq = 16 * nb)."""
    return make_layout({"mode": mode, "block": 16, **keys}, heads, 16 * nb)


# ---- fixed: windows of num_local_blocks; global = last block(s) of each window, earlier ones for later patterns
def test_fixed_unidirectional():
    got = layout("fixed", 8, heads=2, num_local_blocks=4, num_global_blocks=1, attention=UNI)
    want = M("10000000", "11000000", "11100000", "11110000", "00011000", "00011100", "00011110", "00011111")
    assert got.shape == (2, 8, 8) and got.dtype == torch.int64
    assert torch.equal(got[0], want) and torch.equal(got[1], want)  # head 0 copied to every head


def test_fixed_bidirectional_without_and_with_horizontal():
    vertical = M("11110001", "11110001", "11110001", "11110001", "00011111", "00011111", "00011111", "00011111")
    both = M("11110001", "11110001", "11110001", "11111111", "00011111", "00011111", "00011111", "11111111")
    kw = dict(num_local_blocks=4, num_global_blocks=1, attention=BI)
    assert torch.equal(layout("fixed", 8, **kw)[0], vertical)
    assert torch.equal(layout("fixed", 8, horizontal_global_attention=True, **kw)[0], both)


def test_fixed_global_pattern_per_head_is_head_mod_patterns():
    got = layout("fixed", 8, heads=5, different_layout_per_head=True, num_local_blocks=4, num_global_blocks=1,
                 num_different_global_patterns=4, attention=UNI)
    head0 = M("10000000", "11000000", "11100000", "11110000", "00011000", "00011100", "00011110", "00011111")
    head1 = M("10000000", "11000000", "11100000", "11110000", "00101000", "00101100", "00101110", "00101111")
    head3 = M("10000000", "11000000", "11100000", "11110000", "10001000", "10001100", "10001110", "10001111")
    assert torch.equal(got[0], head0) and torch.equal(got[1], head1) and torch.equal(got[3], head3)
    assert torch.equal(got[4], got[0])  # 4 % 4 == 0


def test_fixed_short_last_window_takes_its_global_block_clamped_to_the_end():
    # 6 blocks, windows [0..3], [4..5]: the short window's global block is min(4 + 3, 6 - 1) = 5
    got = layout("fixed", 6, num_local_blocks=4, num_global_blocks=1, attention=BI)
    assert torch.equal(got[0], M("111101", "111101", "111101", "111101", "000111", "000111"))
    # 3 blocks, one short window, 2 global blocks: start = min(0 + 2, 3 - 2) = 1, so block (1, 2) is set
    got = layout("fixed", 3, num_local_blocks=4, num_global_blocks=2, attention=UNI)
    assert torch.equal(got[0], M("100", "111", "111"))


def test_fixed_unidirectional_multi_block_global_sets_blocks_above_the_diagonal():
    # DeepSpeed sets rows >= i of columns i..i+ng-1, so (2, 3) and (6, 7) are set although unidirectional
    got = layout("fixed", 8, num_local_blocks=4, num_global_blocks=2, attention=UNI)
    want = M("10000000", "11000000", "11110000", "11110000", "00111000", "00111100", "00111111", "00111111")
    assert torch.equal(got[0], want)
    assert causal_block_count(got).tolist() == [int(want.sum()) - 2]


def test_rugpt3_13b_keeps_1536_of_8256_causal_blocks_per_head():
    got = make_layout(RUGPT3_13B, 40, 2048)
    assert got.shape == (40, 128, 128)
    assert causal_block_total(128) == 8256
    assert causal_block_count(got).tolist() == [1536] * 40
    assert causal_density(got) == pytest.approx(1536 / 8256)
    assert torch.equal(got, got.tril())  # one global block per window: nothing above the diagonal
    assert not torch.equal(got[0], got[1]) and torch.equal(got[0], got[8])


def test_default_mode_is_fixed_with_deepspeed_defaults():
    cfg = normalize_sparse_attention({})
    assert cfg == {"mode": "fixed", "block": 16, "different_layout_per_head": False, "num_local_blocks": 4,
                   "num_global_blocks": 1, "attention": BI, "horizontal_global_attention": False,
                   "num_different_global_patterns": 1}
    assert normalize_sparse_attention({"mode": "bigbird"})["num_random_blocks"] == 0  # DeepSpeed JSON default


def test_misspelled_num_different_global_patterns_warns_and_is_read():
    spelled = dict(RUGPT3_13B)
    misspelled = dict(RUGPT3_13B)
    misspelled["num_differnt_global_patterns"] = misspelled.pop("num_different_global_patterns")
    with pytest.warns(UserWarning, match="num_differnt_global_patterns"):
        got = make_layout(misspelled, 8, 256)
    assert torch.equal(got, make_layout(spelled, 8, 256))


# ---- variable: listed local windows then the last size repeated; globals by index; optional random blocks
def test_variable_windows_and_global_column_unidirectional():
    got = layout("variable", 8, local_window_blocks=[2, 3], attention=UNI)  # windows [0,1] [2..4] [5..7]
    want = M("10000000", "11000000", "10100000", "10110000", "10111000", "10000100", "10000110", "10000111")
    assert torch.equal(got[0], want)


def test_variable_global_ranges_horizontal_bidirectional_skip_out_of_range():
    got = layout("variable", 6, local_window_blocks=[2], global_block_indices=[2, 9],
                 global_block_end_indices=[4, 12], horizontal_global_attention=True, attention=BI)
    assert torch.equal(got[0], M("111100", "111100", "111111", "111111", "001111", "001111"))


def test_variable_random_blocks_are_seeded_and_shared_or_per_head():
    kw = dict(num_random_blocks=3, local_window_blocks=[1], global_block_indices=[], attention=UNI)
    shared = layout("variable", 16, heads=4, **kw)
    assert torch.equal(shared, layout("variable", 16, heads=4, **kw))  # same seed, same layout on every rank
    assert all(torch.equal(shared[h], shared[0]) for h in range(4))
    assert ((shared[0].sum(-1) >= 3) & (shared[0].sum(-1) <= 4)).all()  # diagonal + 3 distinct random blocks
    assert not torch.equal(shared[0], shared[0].tril())  # variable samples all columns, even unidirectional
    per_head = layout("variable", 16, heads=4, different_layout_per_head=True, **kw)
    assert not torch.equal(per_head[0], per_head[1])
    other_seed = make_layout({"mode": "variable", **kw}, 4, 256, seed=7)
    assert not torch.equal(other_seed, shared)


# ---- bigbird: sliding window + first num_global_blocks rows/columns + random; unidirectional = tril of it
def test_bigbird_bidirectional_and_unidirectional():
    band_global = M("111111", "111000", "111100", "101110", "100111", "100011")
    assert torch.equal(layout("bigbird", 6, num_sliding_window_blocks=3, num_global_blocks=1)[0], band_global)
    uni = layout("bigbird", 6, num_sliding_window_blocks=3, num_global_blocks=1, attention=UNI)
    assert torch.equal(uni[0], band_global.tril())


def test_bigbird_random_blocks_per_row():
    kw = dict(num_sliding_window_blocks=0, num_global_blocks=0, different_layout_per_head=True)
    bi = layout("bigbird", 8, heads=3, num_random_blocks=2, **kw)  # diagonal (window 0) + 2 distinct random
    assert ((bi.sum(-1) >= 2) & (bi.sum(-1) <= 3)).all()
    uni = layout("bigbird", 8, heads=3, num_random_blocks=1, attention=UNI, **kw)
    assert torch.equal(uni, uni.tril()) and uni[:, 0, 0].tolist() == [1, 1, 1]


# ---- bslongformer: sliding window + global rows and columns by index; unidirectional = tril
def test_bslongformer():
    bi = M("111111", "111100", "111100", "111111", "100111", "100111")
    assert torch.equal(layout("bslongformer", 6, global_block_indices=[0, 3])[0], bi)
    assert torch.equal(layout("bslongformer", 6, global_block_indices=[0, 3], attention=UNI)[0], bi.tril())
    ranged = layout("bslongformer", 6, num_sliding_window_blocks=1, global_block_indices=[1],
                    global_block_end_indices=[3])
    assert torch.equal(ranged[0], M("111000", "111111", "111111", "011100", "011010", "011001"))


# ---- local_sliding_window: purely local, unidirectional by default
def test_local_sliding_window():
    assert torch.equal(layout("local_sliding_window", 5)[0], M("10000", "11000", "01100", "00110", "00011"))
    assert torch.equal(layout("local_sliding_window", 5, num_sliding_window_blocks=4)[0],
                       M("10000", "11000", "11100", "01110", "00111"))
    assert torch.equal(layout("local_sliding_window", 5, attention=BI)[0],
                       M("11000", "11100", "01110", "00111", "00011"))


def test_dense():
    assert torch.equal(layout("dense", 3, heads=2), torch.ones(2, 3, 3, dtype=torch.int64))


# ---- bad input: one error naming the key
@pytest.mark.parametrize("cfg, seq, match", [
    ({"mode": "sparse"}, 64, r"\.mode: unknown mode 'sparse'"),
    ({"mode": "fixed", "num_random_blocks": 1}, 64, r"num_random_blocks: unknown key for mode 'fixed'"),
    ({"mode": "local_sliding_window", "different_layout_per_head": True}, 64, r"different_layout_per_head: unknown"),
    ({"num_local_blocks": 6, "num_global_blocks": 4}, 64, r"num_local_blocks: .*divisible by num_global_blocks"),
    ({"num_global_blocks": 0}, 64, r"num_global_blocks: must be an integer >= 1"),
    ({"num_local_blocks": 0}, 64, r"num_local_blocks: must be an integer >= 1"),
    ({"attention": "causal"}, 64, r"attention: must be 'unidirectional' or 'bidirectional'"),
    ({"mode": "bslongformer", "attention": "uni"}, 64, r"attention:"),
    ({"attention": UNI, "horizontal_global_attention": True}, 64, r"horizontal_global_attention: only bidir"),
    ({"num_different_global_patterns": 2}, 64, r"num_different_global_patterns: .*different_layout_per_head"),
    ({"different_layout_per_head": True, "num_local_blocks": 4, "num_global_blocks": 2,
      "num_different_global_patterns": 3}, 64, r"num_different_global_patterns: \(3\) must be <= .* = 2"),
    ({"different_layout_per_head": True, "num_different_global_patterns": 0}, 64, r"num_different_global_pat"),
    ({"num_different_global_patterns": 1, "num_differnt_global_patterns": 1}, 64, r"num_differnt_global_pat"),
    ({"block": 16}, 100, r"block: sequence length 100 must be divisible by block size 16"),
    ({"block": 0}, 64, r"block: must be an integer >= 1"),
    ({"block": "16"}, 64, r"block: must be an integer"),
    ({"different_layout_per_head": "yes"}, 64, r"different_layout_per_head: must be true or false"),
    ({"mode": "variable", "global_block_indices": [0, 4], "global_block_end_indices": [2]}, 64,
     r"global_block_end_indices: length 1 must equal global_block_indices length 2"),
    ({"mode": "variable", "global_block_indices": [3], "global_block_end_indices": [3]}, 64,
     r"global_block_end_indices: each end must be > its start"),
    ({"mode": "variable", "global_block_indices": [-1]}, 64, r"global_block_indices: must be an integer >= 0"),
    ({"mode": "variable", "local_window_blocks": []}, 64, r"local_window_blocks: must be non-empty"),
    ({"mode": "variable", "local_window_blocks": [4, 0]}, 64, r"local_window_blocks: .*end with a positive"),
    ({"mode": "variable", "num_random_blocks": 5}, 64, r"num_random_blocks: \(5\) must be <= .* = 4"),
    ({"mode": "variable", "attention": UNI, "horizontal_global_attention": True}, 64, r"horizontal_global"),
    ({"mode": "bigbird", "num_sliding_window_blocks": 5}, 64, r"num_sliding_window_blocks: \(5\) must be <="),
    ({"mode": "bigbird", "num_global_blocks": 5}, 64, r"num_global_blocks: \(5\) must be <="),
    ({"mode": "bigbird", "num_random_blocks": 5}, 64, r"num_random_blocks: \(5\) must be <="),
    ({"mode": "bigbird", "num_random_blocks": 2, "attention": UNI}, 64, r"num_random_blocks: must be <= 1 for uni"),
    ({"mode": "bigbird", "attention": "left"}, 64, r"attention:"),
    ({"mode": "bslongformer", "num_sliding_window_blocks": 5}, 64, r"num_sliding_window_blocks: \(5\)"),
    ({"mode": "bslongformer", "global_block_indices": [0], "global_block_end_indices": [1, 2]}, 64,
     r"global_block_end_indices: length"),
    ({"mode": "local_sliding_window", "num_sliding_window_blocks": 5}, 64, r"num_sliding_window_blocks: \(5\)"),
])
def test_bad_sections_raise_naming_the_key(cfg, seq, match):
    with pytest.raises(SparsityConfigError, match=match):
        make_layout(cfg, 4, seq)


def test_bad_arguments_raise():
    with pytest.raises(SparsityConfigError, match="JSON object"):
        make_layout([("mode", "fixed")], 4, 64)
    with pytest.raises(SparsityConfigError, match="num_heads must be a positive integer"):
        make_layout({}, 0, 64)
    with pytest.raises(SparsityConfigError, match="seq_length must be a positive integer"):
        make_layout({}, 4, 0)


# ---- tensor parallelism: global head index by default, ru-gpts local index on request
def test_tp_rank_gets_its_slice_of_the_global_layout():
    full = make_layout(RUGPT3_13B, 40, 512)
    parts = [layout_for_tp_rank(RUGPT3_13B, 40, 512, rank, 4) for rank in range(4)]
    assert all(p.shape == (10, 32, 32) for p in parts)
    assert torch.equal(torch.cat(parts), full)
    assert torch.equal(split_heads(full, 1, 4), full[10:20])


def test_ru_gpts_compat_builds_local_heads_with_local_indices():
    full = make_layout(RUGPT3_13B, 40, 512)
    rank1 = layout_for_tp_rank(RUGPT3_13B, 40, 512, 1, 2, ru_gpts_compat=True)
    assert torch.equal(rank1, make_layout(RUGPT3_13B, 20, 512))  # local head i uses pattern i % 8
    assert torch.equal(rank1, layout_for_tp_rank(RUGPT3_13B, 40, 512, 0, 2, ru_gpts_compat=True))
    assert torch.equal(rank1[0], full[0]) and not torch.equal(rank1[0], full[20])  # global head 20: pattern 4
    assert torch.equal(layout_for_tp_rank(RUGPT3_13B, 40, 512, 1, 5, ru_gpts_compat=True), full[8:16])


@pytest.mark.parametrize("rank, size", [(0, 3), (2, 2), (-1, 2)])
def test_tp_bad_rank_or_size(rank, size):
    with pytest.raises(ValueError):
        layout_for_tp_rank(RUGPT3_13B, 40, 512, rank, size)


# ---- which layers are sparse (ru-gpts --sparse-mode)
def test_sparse_layer_selection():
    assert sparse_layer_indices(4, "all") == [True] * 4
    assert sparse_layer_indices(5, "alternating") == [True, False, True, False, True]
    assert sparse_layer_indices(5, "top_bottom") == [True, True, False, False, False]
    assert is_sparse_layer(0, 40, "alternating") and not is_sparse_layer(39, 40, "alternating")
    with pytest.raises(ValueError, match="sparse_mode must be one of"):
        sparse_layer_indices(4, "bottom_top")
    with pytest.raises(ValueError, match="layer 4"):
        is_sparse_layer(4, 4, "all")


def test_layout_to_mask_expands_blocks():
    mask = layout_to_mask(M("10", "11").unsqueeze(0), 2)
    assert mask.dtype == torch.bool and torch.equal(mask[0].long(), M("1100", "1100", "1111", "1111"))
