"""pretrain_gpt.py --finetune from a Hugging Face directory at TP=2 under ZeRO-3 (mpirun --np 2), then the
ZeRO-3 checkpoint (weights only in DeepSpeed's partitions) converts back to HF bit-exactly (lr 0)."""
import pytest
import torch

from megatron_ru import ModelConfig
from megatron_ru.checkpoint.convert import convert
from megatron_ru.checkpoint.load import load_any
from megatron_ru.checkpoint.training import check_compatible
from megatron_ru.config import ConfigError
from tests.helpers import pretrain

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]

transformers = pytest.importorskip("transformers")
VOCAB = 1815  # examples/data/tokenizer


def test_finetune_from_hf_at_tp2_zero3_and_back(tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                     activation_function="gelu_new")
    hf_model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # non-zero biases
    hf_model.save_pretrained(tmp_path / "hf")
    config = ModelConfig.from_preset("tiny-gpt3", vocab_size=VOCAB)
    with pytest.raises(ConfigError, match="add --finetune"):  # resuming needs our training state
        check_compatible(str(tmp_path / "hf"), config, 2, weights_only=False)

    proc, records = pretrain(tmp_path, "ft", "--train-iters", "1", "--lr", "0", "--seq-length", "32",
                             "--load", str(tmp_path / "hf"), "--finetune", "--save", str(tmp_path / "z3"),
                             "--tensor-model-parallel-size", "2", "--deepspeed_config",
                             "configs/ds_zero3.json", np_=2)
    assert "loaded weights from" in proc.stdout and records
    tag_dir = tmp_path / "z3" / "iter_0000001"
    assert not (tag_dir / "mp_rank_00_model_states.pt").exists()  # ZeRO-3 writes partitions only
    assert list(tag_dir.glob("zero_pp_rank_0_mp_rank_01_optim_states.pt"))

    _, full, meta = load_any(tmp_path / "z3")
    _, ref, _ = load_any(tmp_path / "hf")
    assert meta["tensor_model_parallel_size"] == 2
    assert all(torch.equal(full[k], ref[k]) for k in ref)
    convert(tmp_path / "z3", tmp_path / "back", "hf", quiet=True)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, hf_model(input_ids=x).logits)
