"""ru-gpts and Megatron-LM imports: synthetic checkpoints written here at MP=2 in their own layouts
(per-rank QKV orders, padded vocabulary, master_layout buffers) load back to the model they came from."""
import argparse

import pytest
import torch

from megatron_ru import GPTModel, ModelConfig
from megatron_ru.checkpoint.convert import convert
from megatron_ru.checkpoint.load import detect_format, load_any, load_model, read_any_config, read_config
from megatron_ru.checkpoint.model_io import CheckpointError
from megatron_ru.model.sparsity import make_layout
from tests.foreign_fixtures import MP, SPARSE, rank_pieces, write_rugpts

def logits(model, n=40):
    x = torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("per_rank_layout", [False, True])
def test_rugpts_mp2_imports_exactly(tmp_path, per_rank_layout):
    cfg = ModelConfig.from_preset("tiny-gpt3", sparse_attention=SPARSE, sparse_mode="alternating",
                                  max_position_embeddings=64)
    model = GPTModel(cfg, seed=2)
    seq, heads = 64, cfg.num_attention_heads
    if per_rank_layout:  # ru-gpts: each rank built the layout of its local heads
        layouts = [make_layout(SPARSE, heads // MP, seq)] * MP
    else:
        full = make_layout(SPARSE, heads, seq)
        layouts = list(full.chunk(MP))
    write_rugpts(tmp_path / "rg", model, layouts)
    assert detect_format(tmp_path / "rg") == "ru_gpts"
    config, meta = read_config(tmp_path / "rg")
    assert meta["tensor_model_parallel_size"] == MP and config.vocab_size == 1000
    assert config.sparse_layers() == [True, False] and config.sparse_ru_gpts_head_indexing == per_rank_layout
    if not per_rank_layout:
        assert (logits(load_model(tmp_path / "rg")) - logits(model)).abs().max().item() <= 1e-5
    _, full, _ = load_any(tmp_path / "rg")
    ref = {k: v[:1000] if k == "embed.weight" else v for k, v in model.state_dict().items()}
    assert all(torch.equal(full[k], ref[k]) for k in ref)
    convert(tmp_path / "rg", tmp_path / "ours", "megatron_ru", target_tp=2, quiet=True)
    assert read_config(tmp_path / "ours")[0].sparse_ru_gpts_head_indexing == per_rank_layout


def megatron_args(cfg: ModelConfig, version_llama: bool) -> argparse.Namespace:
    a = dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
             num_attention_heads=cfg.num_attention_heads, ffn_hidden_size=cfg.ffn_hidden_size,
             max_position_embeddings=cfg.max_position_embeddings, padded_vocab_size=1024,
             make_vocab_size_divisible_by=128, tensor_model_parallel_size=MP, layernorm_epsilon=cfg.norm_eps)
    if version_llama:
        a.update(swiglu=True, normalization="RMSNorm", position_embedding_type="rope", add_bias_linear=False,
                 group_query_attention=True, num_query_groups=cfg.num_key_value_heads,
                 untie_embeddings_and_output_weights=True, rotary_base=int(cfg.rope_theta))
    else:
        a.update(openai_gelu=True)
    return argparse.Namespace(**a)


def megatron_qkv(q, k, v, version, cfg):
    """Local q/k/v rows of one rank → Megatron's fused order for `version`."""
    hn = cfg.head_dim
    np_, ng = q.shape[0] // hn, k.shape[0] // hn
    rest = q.shape[1:]
    if version == 0:
        return torch.cat([q, k, v])
    if version == 1.0:  # (np, hn, 3)
        return torch.stack([q, k, v]).reshape(3, np_, hn, *rest).permute(1, 2, 0, *range(3, 3 + len(rest))) \
            .reshape(3 * np_ * hn, *rest)
    groups = []  # (ng, np/ng + 2, hn)
    for g in range(ng):
        per = np_ // ng
        groups += [q[g * per * hn:(g + 1) * per * hn], k[g * hn:(g + 1) * hn], v[g * hn:(g + 1) * hn]]
    return torch.cat(groups)


@pytest.mark.parametrize("family,version", [("gpt3", 0), ("gpt3", 1.0), ("gpt3", 2.0), ("llama", 3.0)])
def test_megatron_legacy_mp2_imports_exactly(tmp_path, family, version):
    cfg = ModelConfig.from_preset(f"tiny-{family}", num_attention_heads=8,
                                  num_key_value_heads=2 if family == "llama" else 8)
    model = GPTModel(cfg, seed=4)
    d = tmp_path / "meg"
    for r in range(MP):
        pc = rank_pieces(model, r, pad_to=1024)
        enc = {}
        for i, L in enumerate(pc["layers"]):
            p = f"layers.{i}."
            enc[p + "input_layernorm.weight"] = L["norm1"]["weight"]
            enc[p + "post_attention_layernorm.weight"] = L["norm2"]["weight"]
            enc[p + "self_attention.query_key_value.weight"] = megatron_qkv(*L["qkv"]["weight"], version, cfg)
            enc[p + "self_attention.dense.weight"] = L["dense_w"]
            enc[p + "mlp.dense_h_to_4h.weight"] = L["up_w"]
            enc[p + "mlp.dense_4h_to_h.weight"] = L["down_w"]
            if family == "gpt3":
                enc[p + "input_layernorm.bias"] = L["norm1"]["bias"]
                enc[p + "post_attention_layernorm.bias"] = L["norm2"]["bias"]
                enc[p + "self_attention.query_key_value.bias"] = megatron_qkv(*L["qkv"]["bias"], version, cfg)
                enc[p + "self_attention.dense.bias"] = L["dense_b"]
                enc[p + "mlp.dense_h_to_4h.bias"] = L["up_b"]
                enc[p + "mlp.dense_4h_to_h.bias"] = L["down_b"]
        enc.update({f"final_layernorm.{k}": v for k, v in pc["final"].items()})
        lm = {"embedding": {"word_embeddings": {"weight": pc["emb"]}}, "encoder": enc}
        if family == "gpt3":
            lm["embedding"]["position_embeddings"] = {"weight": pc["pos"]}
        else:
            head = model.state_dict()["lm_head.weight"][:1000]
            head = torch.cat([head, torch.zeros(24, head.shape[1])])
            lm["output_layer"] = {"weight": head.chunk(MP)[r].clone()}
        (d / "iter_0000050" / f"mp_rank_{r:02d}").mkdir(parents=True)
        torch.save({"model": {"language_model": lm}, "checkpoint_version": version, "iteration": 50,
                    "args": megatron_args(cfg, family == "llama")},
                   d / "iter_0000050" / f"mp_rank_{r:02d}" / "model_optim_rng.pt")
    (d / "latest_checkpointed_iteration.txt").write_text("50")
    assert detect_format(d) == "megatron_legacy"
    config, full, meta = load_any(d, vocab_size=1000)
    assert meta["checkpoint_version"] == version and config.num_key_value_heads == cfg.num_key_value_heads
    ref = {k: v[:1000] if k in ("embed.weight", "lm_head.weight") else v for k, v in model.state_dict().items()}
    assert set(full) == set(ref) and all(torch.equal(full[k], ref[k]) for k in ref)
    convert(d, tmp_path / "hf", "hf", vocab_size=1000, quiet=True)
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_rugpts_missing_rank_and_unknown_heads(tmp_path):
    cfg = ModelConfig.from_preset("tiny-gpt3", max_position_embeddings=64)
    write_rugpts(tmp_path / "rg", GPTModel(cfg, seed=2), layouts=None)
    (tmp_path / "rg" / "1000" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing mp_rank_00_model_states.pt"):
        read_config(tmp_path / "rg")
    cfg3 = ModelConfig.from_preset("tiny-gpt3", num_layers=3, max_position_embeddings=64)  # no preset
    write_rugpts(tmp_path / "rg2", GPTModel(cfg3, seed=2), layouts=None)
    (tmp_path / "rg2" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="--num-attention-heads"):
        read_config(tmp_path / "rg2")
    config, _ = read_any_config(tmp_path / "rg2", num_attention_heads=4, vocab_size=1000)
    assert config.num_attention_heads == 4 and config.num_layers == 3


def test_mixed_formats_are_refused(tmp_path):
    cfg = ModelConfig.from_preset("tiny-gpt3", max_position_embeddings=64)
    write_rugpts(tmp_path / "rg", GPTModel(cfg, seed=2), layouts=None)
    (tmp_path / "rg" / "model.safetensors").write_bytes(b"")  # an HF model in the same directory
    with pytest.raises(CheckpointError, match="mixes checkpoint formats"):
        convert(tmp_path / "rg", tmp_path / "out", "hf", quiet=True)
    assert not (tmp_path / "out").exists()
