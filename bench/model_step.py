"""Benchmark: forward+backward tokens/s of our GPTModel at TP=1 against Hugging Face
GPT2LMHeadModel / LlamaForCausalLM with the same shapes, batch and threads, in the same run.

    python bench/model_step.py [--steps 5] [--quick]

Ours and HF alternate step by step, so machine noise hits both alike; the table reports the
median step time of each. Ratio > 1 means we are faster.
"""
import argparse
import statistics
import time

import torch

from megatron_ru import GPTModel, ModelConfig

CASES = [
    # (name, preset, overrides, batch, seq)
    ("tiny-gpt3", "tiny-gpt3", {}, 8, 256),
    ("gpt3-125M", "rugpt3-small", {"max_position_embeddings": 1024}, 2, 256),
    ("tiny-llama", "tiny-llama", {}, 8, 256),
    ("llama-125M", "tiny-llama", dict(num_layers=12, hidden_size=768, num_attention_heads=12,
                                      num_key_value_heads=4, ffn_hidden_size=2048, vocab_size=50257,
                                      max_position_embeddings=1024), 2, 256),
]


def hf_model(cfg: ModelConfig):
    if cfg.is_llama:
        from transformers import LlamaConfig, LlamaForCausalLM
        hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_key_value_heads,
                         max_position_embeddings=cfg.max_position_embeddings,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                         tie_word_embeddings=False, attn_implementation="sdpa")
        return LlamaForCausalLM(hf)
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings,
                    n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_attention_heads,
                    activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    layer_norm_epsilon=cfg.norm_eps, attn_implementation="sdpa")
    return GPT2LMHeadModel(hf)


def step(model, tokens, ours: bool) -> float:
    t0 = time.perf_counter()
    if ours:
        loss = model(tokens[:, :-1], labels=tokens[:, 1:])
    else:
        loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss  # HF shifts inside
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny models only")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, TP=1, CPU")
    rows = []
    for name, preset, overrides, batch, seq in CASES:
        if args.quick and not name.startswith("tiny"):
            continue
        cfg = ModelConfig.from_preset(preset, **overrides)
        ours, ref = GPTModel(cfg, seed=1).train(), hf_model(cfg).train()
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
        times = {True: [], False: []}
        for i in range(args.steps + 1):  # first round is warm-up
            for is_ours, model in ((True, ours), (False, ref)):
                t = step(model, tokens, is_ours)
                if i:
                    times[is_ours].append(t)
        t_ours, t_hf = statistics.median(times[True]), statistics.median(times[False])
        n_tok = batch * seq
        rows.append((name, f"{cfg.num_parameters() / 1e6:.1f}M", f"{batch}x{seq}",
                     f"{n_tok / t_ours:,.0f}", f"{n_tok / t_hf:,.0f}", f"{t_hf / t_ours:.2f}x"))
    header = ("model", "params", "batch", "ours tok/s", "HF tok/s", "ours/HF")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths)] + rows:
        print(" | ".join(str(c).rjust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
