"""LoRA: frozen base, merged weights = base + adapters, PEFT export loaded by the real `peft`."""
import json

import pytest
import torch

from megatron_ru.checkpoint.convert import convert
from megatron_ru.checkpoint.load import load_model
from megatron_ru.checkpoint.model_io import CheckpointError, save_model
from megatron_ru.checkpoint.peft import export_peft
from megatron_ru.config import ModelConfig
from megatron_ru.model.gpt import GPTModel
from megatron_ru.checkpoint.lora_files import attach_adapters, save_adapters
from megatron_ru.model.lora import LoRAError, adapter_parameters, apply_lora, parse_targets
from megatron_ru.training.optim import param_groups
from tests.helpers import assert_rel_close

SHAPES = {"gpt3": dict(family="gpt3", num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=97,
                       max_position_embeddings=64),
          "llama": dict(family="llama", num_layers=2, hidden_size=32, num_attention_heads=4,
                        num_key_value_heads=2, ffn_hidden_size=48, vocab_size=97,
                        max_position_embeddings=64)}


def lora_model(family, targets, seed=3):
    """A base model and the same model with random (non-zero) adapters."""
    torch.manual_seed(0)
    base = GPTModel(ModelConfig(**SHAPES[family]), seed=seed).eval()
    model = GPTModel(ModelConfig(**SHAPES[family]), seed=seed).eval()
    apply_lora(model, rank=4, alpha=8.0, targets=targets, seed=seed)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return base, model


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(5))


def test_base_frozen_and_out_of_optimizer():
    _, model = lora_model("llama", "qkv,proj,fc1,fc2,lm_head")
    groups = param_groups(model, 0.01)
    in_opt = {id(p) for g in groups for p in g["params"]}
    adapters = {id(p) for _, p in adapter_parameters(model)}
    assert in_opt == adapters and len(adapters) == 2 * (4 * 2 + 1)
    assert all(not p.requires_grad for n, p in model.named_parameters() if id(p) not in adapters)


def test_targets_by_hf_names_and_bad_targets():
    assert parse_targets("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj") == \
        ["qkv", "proj", "fc1", "fc2"]
    assert parse_targets("c_attn,mlp.c_proj") == ["qkv", "fc2"]
    with pytest.raises(LoRAError, match="'wq' is not a layer"):
        parse_targets("qkv,wq")
    with pytest.raises(LoRAError, match="one fused layer"):
        parse_targets("q_proj,v_proj")


@pytest.mark.parametrize("family,targets", [("gpt3", "qkv,proj,fc1,fc2"), ("llama", "qkv,proj,fc1,fc2,lm_head")])
def test_merged_model_equals_base_plus_adapters(tmp_path, tokens, family, targets):
    base, model = lora_model(family, targets)
    save_model(tmp_path / "base", base)
    save_adapters(model, tmp_path / "lora", base=str(tmp_path / "base"))
    convert(tmp_path / "base", tmp_path / "merged", "megatron_ru", adapters=str(tmp_path / "lora"),
            quiet=True)
    merged = load_model(tmp_path / "merged").eval()
    with torch.no_grad():
        assert_rel_close(merged(tokens), model(tokens), 1e-5, "merged vs LoRA logits")
        assert (base(tokens) - model(tokens)).abs().max() > 1e-2  # the adapters do something
    attached = load_model(tmp_path / "base").eval()  # --lora DIR at sampling: not merged
    attach_adapters(attached, tmp_path / "lora")
    with torch.no_grad():
        assert_rel_close(attached(tokens), model(tokens), 1e-6, "attached vs LoRA logits")


def test_tied_lm_head_cannot_merge_and_shape_mismatch(tmp_path):
    base, model = lora_model("gpt3", "qkv,lm_head")
    save_model(tmp_path / "base", base)
    save_adapters(model, tmp_path / "lora", base=str(tmp_path / "base"))
    with pytest.raises(LoRAError, match="tied embeddings"):
        convert(tmp_path / "base", tmp_path / "merged", "megatron_ru", adapters=str(tmp_path / "lora"),
                quiet=True)
    assert not (tmp_path / "merged").exists()
    other = GPTModel(ModelConfig(**dict(SHAPES["gpt3"], hidden_size=64)))
    with pytest.raises(LoRAError, match="hidden_size=32"):
        attach_adapters(other, tmp_path / "lora")


@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_peft_export_loads_in_peft_with_equal_logits(tmp_path, tokens, family):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base, model = lora_model(family, "qkv,proj,fc1,fc2,lm_head")
    save_model(tmp_path / "base", base)
    save_adapters(model, tmp_path / "lora", base=str(tmp_path / "base"))
    convert(tmp_path / "base", tmp_path / "hf", "hf", quiet=True)
    export_peft(tmp_path / "lora", tmp_path / "peft", base_name=str(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = peft_model(tokens).logits
        ours = model(tokens)
        assert_rel_close(theirs, ours, 1e-4, "peft vs ours")
        with peft_model.disable_adapter():
            assert_rel_close(peft_model(tokens).logits, base(tokens), 1e-4, "HF base vs our base")
        assert (theirs - base(tokens)).abs().max() > 1e-2


def test_convert_cli_peft_and_missing_base(tmp_path):
    import shutil
    from tools import convert_checkpoint
    base, model = lora_model("llama", "qkv,fc2")
    save_model(tmp_path / "base", base)
    save_adapters(model, tmp_path / "lora", base=str(tmp_path / "base"))
    assert convert_checkpoint.main(["--load", str(tmp_path / "lora"), "--save", str(tmp_path / "peft"),
                                    "--to", "peft", "--quiet"]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {f"model.layers.{i}.{m}" for i in range(2) for m in
                                          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "mlp.down_proj")}
    with pytest.raises(CheckpointError, match="--to peft needs a LoRA adapter directory"):
        convert_checkpoint.main(["--load", str(tmp_path / "base"), "--save", str(tmp_path / "x"), "--to", "peft"])
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(LoRAError, match="need their base model"):
        convert_checkpoint.main(["--load", str(tmp_path / "lora"), "--save", str(tmp_path / "merged"),
                                 "--to", "megatron_ru", "--quiet"])
    assert not (tmp_path / "merged").exists()
