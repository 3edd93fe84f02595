"""Architecture parity: our GPTModel and Hugging Face GPT2LMHeadModel / LlamaForCausalLM with the
same weights give the same logits and loss (fp32, 1e-5). The key map here is test-local; the
user-facing converter is megatron_ru/checkpoint/convert.py's job."""
import pytest
import torch

from megatron_ru import GPTModel, ModelConfig
from tests.helpers import assert_rel_close

transformers = pytest.importorskip("transformers")


def gpt2_from_ours(model: GPTModel):
    cfg = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers, n_head=cfg.num_attention_heads, activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    sd = {"transformer.wte.weight": model.embed.weight[: cfg.vocab_size],
          "transformer.wpe.weight": model.pos_embed.weight,
          "transformer.ln_f.weight": model.final_norm.weight, "transformer.ln_f.bias": model.final_norm.bias}
    for i, b in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": b.norm1.weight, p + "ln_1.bias": b.norm1.bias,
                   p + "ln_2.weight": b.norm2.weight, p + "ln_2.bias": b.norm2.bias,
                   p + "attn.c_attn.weight": b.attn.qkv.weight.T, p + "attn.c_attn.bias": b.attn.qkv.bias,
                   p + "attn.c_proj.weight": b.attn.dense.weight.T, p + "attn.c_proj.bias": b.attn.dense.bias,
                   p + "mlp.c_fc.weight": b.mlp.up.weight.T, p + "mlp.c_fc.bias": b.mlp.up.bias,
                   p + "mlp.c_proj.weight": b.mlp.down.weight.T, p + "mlp.c_proj.bias": b.mlp.down.bias})
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return hf, sd


def llama_from_ours(model: GPTModel):
    cfg = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False))
    q, kv, f = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.ffn_hidden_size
    sd = {"model.embed_tokens.weight": model.embed.weight[: cfg.vocab_size],
          "model.norm.weight": model.final_norm.weight,
          "lm_head.weight": model.lm_head.weight[: cfg.vocab_size]}
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        wq, wk, wv = b.attn.qkv.weight.split([q, kv, kv])
        gate, up = b.mlp.up.weight.split([f, f])
        sd.update({p + "input_layernorm.weight": b.norm1.weight,
                   p + "post_attention_layernorm.weight": b.norm2.weight,
                   p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                   p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": b.attn.dense.weight,
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": b.mlp.down.weight})
    return hf, sd


@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_logits_and_loss_match_hf(family):
    if family == "gpt3":
        cfg = ModelConfig.from_preset("tiny-gpt3", num_layers=3)
        make = gpt2_from_ours
    else:
        cfg = ModelConfig.from_preset("tiny-llama", num_layers=3, rope_theta=500000.0)
        make = llama_from_ours
    ours = GPTModel(cfg, seed=3).eval()
    hf, sd = make(ours)
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k and "attn.bias" not in k
                                   and "masked_bias" not in k], missing
    hf.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits = ours(tokens)
        out = hf(input_ids=tokens, labels=tokens)
        ours_loss = ours(tokens[:, :-1], labels=tokens[:, 1:])
    assert_rel_close(ours_logits, out.logits, 1e-5, f"{family} logits")
    assert_rel_close(ours_loss, out.loss, 1e-5, f"{family} loss")
