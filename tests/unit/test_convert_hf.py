"""Hugging Face import/export parity: random GPT2LMHeadModel / LlamaForCausalLM (GQA) → ours and back,
same logits (fp32, 1e-4 absolute) and identical greedy continuations; tokenizer files travel along."""
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from megatron_ru import GPTModel, ModelConfig
from megatron_ru.checkpoint.convert import convert
from megatron_ru.checkpoint.load import detect_format, load_any, load_model, read_config
from megatron_ru.checkpoint.model_io import save_model, write_config
from megatron_ru.data.tokenizers import build_tokenizer

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer"
VOCAB = 1815  # examples/data/tokenizer


def random_hf(family: str):
    torch.manual_seed(0)
    if family == "gpt3":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                      n_inner=160, activation_function="gelu_new", resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=50000.0,
                                       tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():  # biases and norms random too: every map is exercised
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in name or "ln_" in name else 0.05)
                    + (1.0 if ("norm" in name or "ln_" in name) and p.dim() == 1 and "bias" not in name else 0))
    return model.eval()


def greedy(step, tokens, n):
    for _ in range(n):
        nxt = step(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


def tokens(n=24, batch=2):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_import_hf_matches_logits_and_greedy(tmp_path, family):
    hf_model = random_hf(family)
    hf_model.save_pretrained(tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == "hf"
    ours = load_model(tmp_path / "hf").eval()  # the loader path generate.py uses
    x = tokens()
    with torch.no_grad():
        expected = hf_model(input_ids=x).logits
        got = ours(x)
        assert (got - expected).abs().max().item() <= 1e-4
        hf_ids = hf_model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)
        our_ids = greedy(ours, x, 8)
    assert torch.equal(hf_ids, our_ids)


@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_export_hf_loads_in_transformers(tmp_path, family):
    cfg = ModelConfig.from_preset(f"tiny-{family}", vocab_size=VOCAB, max_position_embeddings=128)
    ours = GPTModel(cfg, seed=5).eval()
    with torch.no_grad():
        for p in ours.parameters():  # non-trivial biases and norms
            p.add_(torch.randn_like(p) * 0.02)
    save_model(tmp_path / "ours", ours)
    shutil.copytree(TOKENIZER, tmp_path / "ours" / "tokenizer")
    write_config(tmp_path / "ours", cfg, 1, tokenizer={"type": "GPT2BPETokenizer",
                                                       "vocab_file": "tokenizer/vocab.json",
                                                       "merge_file": "tokenizer/merges.txt"})
    convert(tmp_path / "ours", tmp_path / "hf", "hf", quiet=True)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = tokens()
    with torch.no_grad():
        assert (hf_model(input_ids=x).logits - ours(x)).abs().max().item() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Привет, мир! Это проверка токенизатора."
    ids = tok(text)["input_ids"]
    ref = build_tokenizer("GPT2BPETokenizer", vocab_file=str(TOKENIZER / "vocab.json"),
                          merge_file=str(TOKENIZER / "merges.txt"))
    assert ids and ids == ref.tokenize(text)
    assert tok.decode(ids) == text and tok.eos_token == "<|endoftext|>"
    # and back: HF → ours reproduces every tensor exactly
    _, back, meta = load_any(tmp_path / "hf")
    _, orig, _ = load_any(tmp_path / "ours")
    assert meta["format"] == "hf" and set(back) == set(orig)
    assert all(torch.equal(back[k], orig[k]) for k in orig)


def test_sharded_safetensors_with_index_round_trip(tmp_path):
    hf_model = random_hf("llama")
    hf_model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ours", "megatron_ru", target_tp=2, quiet=True)
    # views into the memory map are copied first (torch.save would write the whole file per view);
    # the slack covers vocabulary padding and zip headers
    written = sum(f.stat().st_size for f in (tmp_path / "ours").rglob("*.pt"))
    assert written < 1.25 * (tmp_path / "hf" / "model.safetensors").stat().st_size
    convert(tmp_path / "ours", tmp_path / "sharded", "hf", max_shard_bytes=200_000, quiet=True)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, hf_model(input_ids=x).logits)
    cfg, meta = read_config(tmp_path / "sharded")
    assert meta["format"] == "hf" and cfg.num_key_value_heads == 2


def test_export_of_sparse_model_warns(tmp_path):
    cfg = ModelConfig.from_preset("tiny-gpt3", sparse_attention={"mode": "fixed", "block": 16,
                                                                 "num_local_blocks": 2})
    save_model(tmp_path / "ours", GPTModel(cfg, seed=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(tmp_path / "ours", tmp_path / "hf", "hf", quiet=True)
    assert any("run them dense" in str(w.message) for w in caught)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
