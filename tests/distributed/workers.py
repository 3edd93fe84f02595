"""Per-rank bodies of the distributed tests (run under tests.helpers.run_ranks, gloo on CPU).

Every rank builds the TP=1 reference itself from the same seed and compares its own shard
against the matching slice of the reference, so nothing but the code under test communicates.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_ru import ConfigError, GPTModel, ModelConfig, ParallelState
from megatron_ru.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_ru.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_ru.parallel.sharding import ShardSpec, shard
from tests.helpers import assert_rel_close

TOL = 1e-5


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def layers(rank, world):
    ps = ParallelState.from_environment(tensor_model_parallel_size=world)
    assert (ps.tp_rank, ps.tp_size, ps.dp_size) == (rank, world, 1)

    # Column-parallel with fused sections (like QKV), gathered output.
    sections = (8, 4, 4)
    w, b = _rand(16, 6, seed=1), _rand(16, seed=2)
    col = ColumnParallelLinear(6, 16, parallel_state=ps, sections=sections, gather_output=True)
    spec = ShardSpec(0, sections)
    with torch.no_grad():
        col.weight.copy_(shard(w, spec, rank, world))
        col.bias.copy_(shard(b, spec, rank, world))
    x, gy = _rand(3, 5, 6, seed=3).requires_grad_(), _rand(3, 5, 16, seed=4)
    y = col(x)
    # the gathered output is in per-rank section order; compare with the reference reordered
    ref_w = torch.cat([shard(w, spec, r, world) for r in range(world)])
    ref_b = torch.cat([shard(b, spec, r, world) for r in range(world)])
    xr = x.detach().clone().requires_grad_()
    wr, br = ref_w.clone().requires_grad_(), ref_b.clone().requires_grad_()
    yr = F.linear(xr, wr, br)
    assert_rel_close(y, yr, TOL, "column forward")
    y.backward(gy)
    yr.backward(gy)
    assert_rel_close(x.grad, xr.grad, TOL, "column input grad")
    per = 16 // world
    assert_rel_close(col.weight.grad, wr.grad[rank * per:(rank + 1) * per], TOL, "column weight grad")

    # Row-parallel taking a full input (scattered inside).
    w2, b2 = _rand(7, 12, seed=5), _rand(7, seed=6)
    row = RowParallelLinear(12, 7, parallel_state=ps, input_is_parallel=False)
    with torch.no_grad():
        row.weight.copy_(shard(w2, ShardSpec(1), rank, world))
        row.bias.copy_(b2)
    x2, gy2 = _rand(4, 12, seed=7).requires_grad_(), _rand(4, 7, seed=8)
    x2r, w2r = x2.detach().clone().requires_grad_(), w2.clone().requires_grad_()
    y2, y2r = row(x2), F.linear(x2r, w2r, b2)
    assert_rel_close(y2, y2r, TOL, "row forward")
    y2.backward(gy2)
    y2r.backward(gy2)
    assert_rel_close(x2.grad, x2r.grad, TOL, "row input grad")
    assert_rel_close(row.weight.grad, shard(w2r.grad, ShardSpec(1), rank, world), TOL, "row weight grad")
    assert_rel_close(row.bias.grad, gy2.sum(0), TOL, "row bias grad")

    # Vocab-parallel embedding.
    table = _rand(32, 5, seed=9)
    emb = VocabParallelEmbedding(32, 5, parallel_state=ps)
    with torch.no_grad():
        emb.weight.copy_(shard(table, ShardSpec(0), rank, world))
    ids = torch.randint(0, 32, (3, 9), generator=torch.Generator().manual_seed(10))
    tr = table.clone().requires_grad_()
    out, outr = emb(ids), F.embedding(ids, tr)
    assert_rel_close(out, outr, TOL, "embedding forward")
    g = _rand(3, 9, 5, seed=11)
    out.backward(g)
    outr.backward(g)
    assert_rel_close(emb.weight.grad, shard(tr.grad, ShardSpec(0), rank, world), TOL, "embedding grad")

    # Vocab-parallel cross entropy, with ignored targets.
    logits = (3 * _rand(6, 10, 40, seed=12))
    target = torch.randint(0, 40, (6, 10), generator=torch.Generator().manual_seed(13))
    target[0, :3] = -100
    local = shard(logits, ShardSpec(2), rank, world).requires_grad_()
    full = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, ps.tp_comm, rank * 40 // world)
    ref = F.cross_entropy(full.view(-1, 40), target.view(-1), reduction="none").view(6, 10)
    assert_rel_close(loss, ref, TOL, "cross entropy")
    gl = _rand(6, 10, seed=14)
    loss.backward(gl)
    ref.backward(gl)
    assert_rel_close(local.grad, shard(full.grad, ShardSpec(2), rank, world), TOL, "cross entropy grad")

    # Bad input: a model whose heads do not split over this TP size.
    heads = 3 if world == 2 else 6  # 48 hidden splits into either; neither splits over `world`
    with pytest.raises(ConfigError, match=f"num_attention_heads={heads} is not divisible by "
                                          f"tensor_model_parallel_size={world}"):
        GPTModel(ModelConfig(hidden_size=48, num_attention_heads=heads), ps)
    with pytest.raises(ConfigError, match=f"world size {world} is not divisible by tensor_model_parallel_size=3"):
        ParallelState.from_environment(tensor_model_parallel_size=3)


MODEL_CONFIGS = {
    # make_vocab_size_divisible_by=96 pads 1000 to 1056 at TP=1 and 1152 at TP=2/4.
    "gpt3": dict(family="gpt3", num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1000,
                 max_position_embeddings=64, make_vocab_size_divisible_by=96),
    "llama": dict(family="llama", num_layers=2, hidden_size=64, num_attention_heads=8,
                  num_key_value_heads=4, ffn_hidden_size=176, vocab_size=1000,
                  max_position_embeddings=64, make_vocab_size_divisible_by=96, rope_theta=500000.0),
    # alternating block-sparse layers with per-head global patterns (global head index)
    "gpt3_sparse": dict(family="gpt3", num_layers=2, hidden_size=64, num_attention_heads=4,
                        vocab_size=1000, max_position_embeddings=64, sparse_mode="alternating",
                        sparse_attention=dict(mode="fixed", block=4, num_local_blocks=4,
                                              num_global_blocks=1, attention="unidirectional",
                                              different_layout_per_head=True,
                                              num_different_global_patterns=4)),
}


def model_parity(rank, world):
    ps = ParallelState.from_environment(tensor_model_parallel_size=world)
    for family, kwargs in MODEL_CONFIGS.items():
        cfg = ModelConfig(**kwargs)
        tp_model, ref = GPTModel(cfg, ps, seed=5), GPTModel(cfg, None, seed=5)
        assert tp_model.padded_vocab_size == cfg.padded_vocab_size(world)
        tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
        logits = tp_model.gather_logits(tp_model(tokens))
        assert_rel_close(logits, ref(tokens), TOL, f"{family} logits")
        loss = tp_model(tokens[:, :-1], labels=tokens[:, 1:])
        loss_ref = ref(tokens[:, :-1], labels=tokens[:, 1:])
        assert_rel_close(loss, loss_ref, TOL, f"{family} loss")
        loss.backward()
        loss_ref.backward()
        ref_params = dict(ref.named_parameters())
        for name, p in tp_model.named_parameters():
            rp = ref_params[name]
            if name in ("embed.weight", "lm_head.weight"):  # padded differently at each TP
                start, end = tp_model.vocab_start, tp_model.vocab_start + p.shape[0]
                real = max(0, min(end, cfg.vocab_size) - start)
                assert torch.equal(p[:real], rp[start:start + real]), f"{family} {name} init"
                assert_rel_close(p.grad[:real], rp.grad[start:start + real], TOL, f"{family} {name} grad")
                assert torch.all(p[real:] == 0) and torch.all(p.grad[real:] == 0), f"{name} padding"
                continue
            spec = getattr(p, "shard_spec", None)
            assert torch.equal(p, shard(rp.detach(), spec, rank, world)), f"{family} {name} init"
            assert_rel_close(p.grad, shard(rp.grad, spec, rank, world), TOL, f"{family} {name} grad")


def save_sharded(rank, world, directory):
    """Write a checkpoint at TP=world; the caller loads it at other TP sizes."""
    from megatron_ru.checkpoint.model_io import save_model
    ps = ParallelState.from_environment(tensor_model_parallel_size=world)
    save_model(directory, GPTModel(ModelConfig(**MODEL_CONFIGS["llama"]), ps, seed=9), tag="step5")


def load_resharded(rank, world, directory):
    """Load a checkpoint written at another TP size; logits must equal the original model's."""
    from megatron_ru.checkpoint.load import load_model
    ps = ParallelState.from_environment(tensor_model_parallel_size=world)
    model = load_model(directory, ps)
    ref = GPTModel(ModelConfig(**MODEL_CONFIGS["llama"]), None, seed=9)
    tokens = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(4))
    assert_rel_close(model.gather_logits(model(tokens)), ref(tokens), TOL, "resharded logits")
    for name, p in model.named_parameters():
        if name not in ("embed.weight", "lm_head.weight"):
            assert torch.equal(p, shard(dict(ref.named_parameters())[name].detach(),
                                        getattr(p, "shard_spec", None), rank, world)), name
