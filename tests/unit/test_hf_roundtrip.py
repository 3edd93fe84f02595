"""Lossless Hugging Face round trips: ours -> HF -> ours is bit-identical in weights and config.json
(sparse layout and mode ride in an extra config.json key), the end-of-text token reaches HF for
every tokenizer type, and --sparse-config on an HF import is applied, never ignored."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_ru import GPTModel, ModelConfig
from megatron_ru.checkpoint.convert import convert
from megatron_ru.checkpoint.load import load_any
from megatron_ru.checkpoint.model_io import CheckpointError, save_model, write_config
from megatron_ru.data.hf_tokenizer_json import write_hf_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOK = ROOT / "examples" / "data" / "tokenizer"
VOCAB = 1815
EOD = json.loads((TOK / "vocab.json").read_text(encoding="utf-8"))["<|endoftext|>"]
SPARSE = {"mode": "fixed", "block": 16, "num_local_blocks": 2, "num_global_blocks": 1,
          "different_layout_per_head": True, "num_different_global_patterns": 2}


def ours(path, cfg, kind):
    save_model(path, GPTModel(cfg, seed=9))
    (path / "tokenizer").mkdir()
    if kind == "gpt2":
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(TOK / f, path / "tokenizer" / f)
        entry = {"type": "GPT2BPETokenizer", "eod_token": None, "vocab_file": "tokenizer/vocab.json",
                 "merge_file": "tokenizer/merges.txt"}
    else:
        write_hf_tokenizer(path / "tokenizer", TOK / "vocab.json", TOK / "merges.txt")
        (path / "tokenizer" / "tokenizer_config.json").unlink()
        entry = {"type": "HuggingFaceTokenizer", "eod_token": None, "tokenizer_model": "tokenizer/tokenizer.json"}
    write_config(path, cfg, 1, tokenizer=entry)
    return path


@pytest.mark.parametrize("family,kind", [("gpt3", "gpt2"), ("llama", "hf")])
def test_ours_hf_ours_is_bit_identical(tmp_path, family, kind):
    sparse = dict(sparse_attention=SPARSE, sparse_mode="top_bottom") if family == "gpt3" else {}
    cfg = ModelConfig.from_preset(f"tiny-{family}", vocab_size=VOCAB, make_vocab_size_divisible_by=64, **sparse)
    src = ours(tmp_path / "src", cfg, kind)
    with pytest.warns(UserWarning, match="block-sparse") if sparse else _nothing():
        convert(src, tmp_path / "hf", "hf", quiet=True)
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert hf_cfg["eos_token_id"] == gen["eos_token_id"] == EOD and tok_cfg["eos_token"] == "<|endoftext|>"
    assert hf_cfg["megatron_ru"]["model"]["sparse_attention"] == cfg.sparse_attention
    convert(tmp_path / "hf", tmp_path / "back", "megatron_ru", quiet=True)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    _, a, _ = load_any(src)
    _, b, _ = load_any(tmp_path / "back")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token_id == EOD


def test_chat_template_travels_through_conversions(tmp_path):
    """A tokenizer's chat template (tokenizer_config.json or chat_template.jinja) goes with the
    model: ours → HF embeds it in tokenizer_config.json (transformers applies it), HF → ours keeps
    it under tokenizer/, and the server and generate.py --chat find it there by default."""
    from megatron_ru.data.chat_templates import load_template
    from megatron_ru.data.tokenizers import build_tokenizer
    from megatron_ru.serving.chat_prompt import load_chat_format
    cfg = ModelConfig.from_preset("tiny-llama", vocab_size=VOCAB, make_vocab_size_divisible_by=64)
    src = ours(tmp_path / "src", cfg, "hf")
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant]{% endif %}"
    (src / "tokenizer" / "chat_template.jinja").write_text(template, encoding="utf-8")
    convert(src, tmp_path / "hf", "hf", quiet=True)
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == template and tok_cfg["eos_token"] == "<|endoftext|>"
    messages = [{"role": "user", "content": "Привет"}]
    transformers = pytest.importorskip("transformers")
    hf_text = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert hf_text == "[user] Привет\n[assistant]"
    convert(tmp_path / "hf", tmp_path / "back", "megatron_ru", quiet=True)
    assert (tmp_path / "back" / "tokenizer" / "tokenizer_config.json").is_file()
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "back" / "tokenizer" / "tokenizer.json"))
    own = load_chat_format(None, tok, str(tmp_path / "back" / "tokenizer"))
    assert own.name.endswith("tokenizer_config.json") and own.template.render(messages, True) == hf_text
    listed = tmp_path / "listed.json"  # Hugging Face's named-template form
    listed.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"},
                                                    {"name": "default", "template": template}]}))
    assert load_template(str(listed), tok).render(messages, True) == hf_text


def test_training_checkpoints_carry_the_chat_template(tmp_path):
    """A run's checkpoint copies the tokenizer's chat template files beside its tokenizer."""
    from megatron_ru.checkpoint.training import _copy_tokenizer
    tok_dir = tmp_path / "tok"
    write_hf_tokenizer(tok_dir, TOK / "vocab.json", TOK / "merges.txt")
    (tok_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    (tmp_path / "run").mkdir()
    _copy_tokenizer(tmp_path / "run", {"tokenizer_model": str(tok_dir / "tokenizer.json"), "type": "x"})
    assert sorted(p.name for p in (tmp_path / "run" / "tokenizer").iterdir()) == \
        ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]


def _nothing():
    import contextlib
    return contextlib.nullcontext()


def test_sparse_config_on_hf_import_is_applied(tmp_path, capsys):
    cfg = ModelConfig.from_preset("tiny-gpt3", vocab_size=VOCAB)
    convert(ours(tmp_path / "src", cfg, "gpt2"), tmp_path / "hf", "hf", quiet=True)
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    del raw["megatron_ru"]  # an HF model from elsewhere: no extra key
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    convert(tmp_path / "hf", tmp_path / "sparse", "megatron_ru", quiet=True, sparse_attention=SPARSE)
    back = json.loads((tmp_path / "sparse" / "config.json").read_text())["model"]
    assert back["sparse_attention"] == SPARSE and back["sparse_mode"] == "alternating"
    convert(tmp_path / "sparse", tmp_path / "hf2", "hf", quiet=True)
    other = dict(SPARSE, num_local_blocks=4)
    convert(tmp_path / "hf2", tmp_path / "sparse2", "megatron_ru", quiet=True, sparse_attention=other)
    assert "replaces the sparse_attention section" in capsys.readouterr().out
    assert json.loads((tmp_path / "sparse2" / "config.json").read_text())["model"]["sparse_attention"] == other
    with pytest.raises(CheckpointError, match="--sparse-config applies to ru-gpts and Hugging Face"):
        convert(tmp_path / "sparse", tmp_path / "x", "hf", quiet=True, sparse_attention=SPARSE)
