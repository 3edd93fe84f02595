"""ru-gpts checkpoints built by hand from a GPTModel (MP ranks, junk vocabulary padding, local q|k|v
groups, sparse master layouts), shared by the converter tests and the safe-unpickling tests."""
import json

import torch

from megatron_ru import GPTModel


MP = 2
SPARSE = {"mode": "fixed", "block": 8, "num_local_blocks": 4, "num_global_blocks": 1,
          "different_layout_per_head": True, "num_different_global_patterns": 4}


def rank_pieces(model: GPTModel, r: int, pad_to: int):
    """Rank r of MP: embeddings padded with junk rows, column / row splits, local q|k|v groups."""
    cfg, sd = model.config, {k: v.detach().clone() for k, v in model.state_dict().items()}
    emb = sd["embed.weight"][: cfg.vocab_size]
    emb = torch.cat([emb, torch.randn(pad_to - cfg.vocab_size, emb.shape[1])])  # junk padding
    col = lambda t: t.chunk(MP, 0)[r].clone()  # noqa: E731
    row = lambda t: t.chunk(MP, 1)[r].clone()  # noqa: E731
    q = cfg.hidden_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    out = {"emb": col(emb), "pos": sd.get("pos_embed.weight"), "final": {}, "layers": []}
    out["final"] = {k.split(".")[-1]: v for k, v in sd.items() if k.startswith("final_norm.")}
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        qkv = {}
        for kind in ("weight", "bias"):
            if p + f"attn.qkv.{kind}" in sd:
                a, b, c = sd[p + f"attn.qkv.{kind}"].split([q, kv, kv])
                qkv[kind] = (col(a), col(b), col(c))
        layer = {"qkv": qkv, "dense_w": row(sd[p + "attn.dense.weight"]), "dense_b": sd.get(p + "attn.dense.bias"),
                 "up_w": None, "down_w": row(sd[p + "mlp.down.weight"]), "down_b": sd.get(p + "mlp.down.bias"),
                 "up_b": col(sd[p + "mlp.up.bias"]) if p + "mlp.up.bias" in sd else None,
                 "norm1": {k.split(".")[-1]: v for k, v in sd.items() if k.startswith(p + "norm1.")},
                 "norm2": {k.split(".")[-1]: v for k, v in sd.items() if k.startswith(p + "norm2.")}}
        up = sd[p + "mlp.up.weight"]
        if cfg.is_llama:  # [gate_local; up_local]
            g, u = up.split(cfg.ffn_hidden_size)
            layer["up_w"] = torch.cat([col(g), col(u)])
        else:
            layer["up_w"] = col(up)
        out["layers"].append(layer)
    return out


def write_rugpts(directory, model: GPTModel, layouts):
    cfg = model.config
    (directory / "1000").mkdir(parents=True)
    (directory / "latest_checkpointed_iteration.txt").write_text("1000")
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_head": 4,
                                                       "vocab_size": cfg.vocab_size}))
    (directory / "deepspeed_config.json").write_text(json.dumps({"sparse_attention": SPARSE}))
    for r in range(MP):
        pc = rank_pieces(model, r, pad_to=1024)
        sd = {"word_embeddings.weight": pc["emb"], "position_embeddings.weight": pc["pos"],
              "transformer.final_layernorm.weight": pc["final"]["weight"],
              "transformer.final_layernorm.bias": pc["final"]["bias"]}
        for i, L in enumerate(pc["layers"]):
            p = f"transformer.layers.{i}."
            sd.update({p + "input_layernorm.weight": L["norm1"]["weight"], p + "input_layernorm.bias": L["norm1"]["bias"],
                       p + "attention.query_key_value.weight": torch.cat(L["qkv"]["weight"]),
                       p + "attention.query_key_value.bias": torch.cat(L["qkv"]["bias"]),
                       p + "attention.dense.weight": L["dense_w"], p + "attention.dense.bias": L["dense_b"],
                       p + "post_attention_layernorm.weight": L["norm2"]["weight"],
                       p + "post_attention_layernorm.bias": L["norm2"]["bias"],
                       p + "mlp.dense_h_to_4h.weight": L["up_w"], p + "mlp.dense_h_to_4h.bias": L["up_b"],
                       p + "mlp.dense_4h_to_h.weight": L["down_w"], p + "mlp.dense_4h_to_h.bias": L["down_b"]})
            if layouts and i % 2 == 0:
                sd[p + "attention.sparse_self_attention.master_layout"] = layouts[r]
        torch.save({"module": sd, "mp_world_size": MP, "iteration": 1000},
                   directory / "1000" / f"mp_rank_{r:02d}_model_states.pt")
