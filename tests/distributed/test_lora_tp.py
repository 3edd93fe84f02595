"""LoRA at TP=2 equals TP=1 (gloo, 2 ranks): loss and every adapter gradient, both families."""
import pytest
import torch

from megatron_ru import GPTModel, ModelConfig, ParallelState
from megatron_ru.model.lora import adapter_parameters, adapter_state, apply_lora
from megatron_ru.parallel.sharding import shard
from tests.helpers import assert_rel_close, run_ranks

pytestmark = [pytest.mark.mpirun, pytest.mark.slow]

CONFIGS = {"gpt3": dict(family="gpt3", num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1000,
                        max_position_embeddings=64),
           "llama": dict(family="llama", num_layers=2, hidden_size=64, num_attention_heads=4,
                         num_key_value_heads=2, ffn_hidden_size=96, vocab_size=1000, max_position_embeddings=64)}


def _lora_parity(rank, world):
    ps = ParallelState.from_environment(tensor_model_parallel_size=world)
    for family, kwargs in CONFIGS.items():
        cfg = ModelConfig(**kwargs)
        tp_model, ref = GPTModel(cfg, ps, seed=5), GPTModel(cfg, None, seed=5)
        for m in (tp_model, ref):
            apply_lora(m, rank=4, alpha=16.0, targets="qkv,proj,fc1,fc2,lm_head", seed=9)
        ref_params = dict(adapter_parameters(ref))
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in adapter_parameters(tp_model):
                rp = ref_params[name]
                assert torch.equal(p, shard(rp.detach(), p.shard_spec, rank, world)), f"{name} init"
                if name.endswith(".B"):  # B starts at zero: make it matter
                    rp.copy_(torch.randn(rp.shape, generator=gen) * 0.1)
                    p.copy_(shard(rp.detach(), p.shard_spec, rank, world))
        tokens = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(1))
        mask = (torch.arange(16) % 3 != 0).float().expand(2, 16)
        loss = tp_model(tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask)
        loss_ref = ref(tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask)
        assert_rel_close(loss, loss_ref, 1e-5, f"{family} loss")
        loss.backward()
        loss_ref.backward()
        for name, p in adapter_parameters(tp_model):
            rp = ref_params[name]
            assert_rel_close(p.grad, shard(rp.grad, p.shard_spec, rank, world), 1e-5, f"{family} {name} grad")
        assert all(p.grad is None for n, p in tp_model.named_parameters() if ".lora." not in n
                   and not n.startswith("lora_head"))
        saved, ref_saved = adapter_state(tp_model), adapter_state(ref)  # all-gathered over TP
        assert saved.keys() == ref_saved.keys()
        for name, t in saved.items():
            assert torch.equal(t, ref_saved[name]), f"{family} saved {name}"


def test_lora_tp2_equals_tp1():
    run_ranks(_lora_parity, 2)
