"""The chat template SFT data was rendered with travels with the model: preprocessing records it
beside the data, training saves it as tokenizer/chat_template.jinja, the HF export puts it in
tokenizer_config.json, and the server uses it without --chat-template (no fallback)."""
import json
import subprocess
import sys

import pytest

from megatron_ru.data.chat_templates import BUILTINS, ChatTemplate, load_template
from megatron_ru.data.tokenizers import build_tokenizer
from megatron_ru.serving.chat_prompt import load_chat_format
from tests.helpers import ROOT, TOKENIZER, clean_env, demo_bpe, llama_tokenizer_dir, load_tool, pretrain


@pytest.mark.slow
def test_sft_template_recorded_saved_exported_and_served(tmp_path):
    prefix = tmp_path / "data" / "sft"
    proc = subprocess.run([sys.executable, "tools/preprocess_data.py", "--dataset-type", "sft",
                           "--chat-template", "rugpt3", "--input", "examples/data/ru_sft.jsonl",
                           "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(TOKENIZER / "vocab.json"),
                           "--merge-file", str(TOKENIZER / "merges.txt"), "--output-prefix", str(prefix)],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "data" / "sft_chat_template.jinja").read_text(encoding="utf-8") == BUILTINS["rugpt3"]
    pretrain(tmp_path, "run", "--train-iters", "1", "--micro-batch-size", "2", "--dataset-type", "sft",
             "--data-path", str(prefix), "--split", "90,10,0", "--save", str(tmp_path / "ckpt"),
             "--save-interval", "1")
    tok_dir = tmp_path / "ckpt" / "tokenizer"
    assert (tok_dir / "chat_template.jinja").read_text(encoding="utf-8") == BUILTINS["rugpt3"]
    bpe = demo_bpe()
    fmt = load_chat_format(None, bpe, str(tok_dir))
    assert "has no chat template" not in fmt.name and "the built-in rugpt3" in fmt.name
    assert fmt.stops == ("\nuser:",)
    assert load_tool("convert_checkpoint").main(["--load", str(tmp_path / "ckpt"), "--save",
                                                 str(tmp_path / "hf"), "--to", "hf", "--quiet"]) == 0
    hf_dir = tmp_path / "hf"
    config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    recorded = config.get("chat_template") or (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    assert recorded == BUILTINS["rugpt3"]
    # a LoRA run on the same data: its adapter directory carries the template, and opening it uses it
    pretrain(tmp_path, "lora", "--train-iters", "1", "--micro-batch-size", "2", "--dataset-type", "sft",
             "--data-path", str(prefix), "--split", "90,10,0", "--finetune", "--load", str(tmp_path / "ckpt"),
             "--lora-rank", "2", "--save", str(tmp_path / "adapters"), "--save-interval", "1")
    assert (tmp_path / "adapters" / "chat_template.jinja").read_text(encoding="utf-8") == BUILTINS["rugpt3"]
    from megatron_ru.inference.loading import ModelOptions, open_model
    opened = open_model(ModelOptions(load=str(tmp_path / "adapters")))
    assert opened.template_dir == str(tmp_path / "adapters")
    assert "the built-in rugpt3" in load_template(None, opened.tokenizer, opened.template_dir).name


def test_a_recorded_builtin_keeps_its_end_of_turn_token(tmp_path):
    tok = build_tokenizer("HuggingFaceTokenizer",
                          tokenizer_model=str(llama_tokenizer_dir(tmp_path) / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text(BUILTINS["llama3"], encoding="utf-8")
    template = load_template(None, tok, str(tmp_path))
    assert isinstance(template, ChatTemplate) and "the built-in llama3" in template.name
    assert template.eot_id(tok) == tok.tok.token_to_id("<|eot_id|>")
