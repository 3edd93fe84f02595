"""GPTModel on one process: shapes, causality, cached decode, checkpointing, init determinism."""
import pytest
import torch

from megatron_ru import GPTModel, ModelConfig
from tests.helpers import assert_rel_close

FAMILIES = ["tiny-gpt3", "tiny-llama"]


def build(preset, **overrides):
    torch.manual_seed(0)
    return GPTModel(ModelConfig.from_preset(preset, **overrides), seed=7)


@pytest.mark.parametrize("preset", FAMILIES)
def test_shapes_and_loss(preset):
    model = build(preset)
    tokens = torch.randint(0, 1000, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, 1000)
    loss = model(tokens[:, :-1], labels=tokens[:, 1:])
    ref = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 1000),
                                            tokens[:, 1:].reshape(-1))
    assert_rel_close(loss, ref, 1e-6, "loss")
    assert loss.ndim == 0 and 6.0 < loss.item() < 7.5  # ~ln(1000) at init


@pytest.mark.parametrize("preset", FAMILIES)
def test_causality(preset):
    model = build(preset)
    tokens = torch.randint(0, 1000, (2, 20))
    base = model(tokens)
    for t in (0, 7, 19):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 1000
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"logits before {t} changed"
        assert not torch.allclose(out[:, t], base[:, t])


def test_ignore_index_and_loss_mask():
    model = build("tiny-gpt3")
    tokens = torch.randint(0, 1000, (2, 9))
    labels = tokens[:, 1:].clone()
    labels[0, :4] = -100
    loss = model(tokens[:, :-1], labels=labels)
    mask = torch.ones_like(labels, dtype=torch.float)
    mask[0, :4] = 0
    loss2 = model(tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask)
    assert_rel_close(loss, loss2, 1e-6, "mask vs ignore_index")


@pytest.mark.parametrize("preset", FAMILIES)
def test_cached_decode_equals_full_recompute(preset):
    model = build(preset).eval()
    tokens = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(batch_size=2, max_length=32)
        steps = [model(tokens[:, :10], cache=cache)]  # prefill
        steps.append(model(tokens[:, 10:13], cache=cache))  # a chunk after a prefix
        for t in range(13, 24):  # one token at a time
            steps.append(model(tokens[:, t:t + 1], cache=cache))
    assert cache.length == 24
    assert_rel_close(torch.cat(steps, dim=1), full, 1e-5, "cached logits")


def test_cache_overflow_is_clear():
    model = build("tiny-llama").eval()
    cache = model.new_cache(batch_size=1, max_length=4)
    with pytest.raises(ValueError, match="KV cache of 4 positions is full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_too_long_sequence_is_clear():
    model = build("tiny-gpt3")
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        model(torch.zeros(1, 257, dtype=torch.long))


@pytest.mark.parametrize("preset", FAMILIES)
def test_activation_checkpointing_gives_same_grads_with_dropout(preset):
    grads = []
    for ckpt in (False, True):
        model = build(preset, hidden_dropout=0.1, attention_dropout=0.1, checkpoint_activations=ckpt)
        model.train()
        model.ps.seed(11)
        tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
        model(tokens[:, :-1], labels=tokens[:, 1:]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert_rel_close(grads[1][name], grads[0][name], 1e-6, name)


def test_init_is_deterministic_and_seed_dependent():
    a, b, c = build("tiny-gpt3"), build("tiny-gpt3"), GPTModel(ModelConfig.from_preset("tiny-gpt3"), seed=8)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), n


def test_init_statistics():
    model = GPTModel(ModelConfig.from_preset("tiny-gpt3", num_layers=8, hidden_size=128), seed=1)
    std = 0.02 / (2 * 8) ** 0.5
    assert abs(model.blocks[0].attn.dense.weight.std().item() - std) < 0.1 * std
    assert abs(model.blocks[0].mlp.up.weight.std().item() - 0.02) < 0.002
    assert torch.all(model.blocks[0].mlp.up.bias == 0)
    assert torch.all(model.blocks[0].norm1.weight == 1)
    emb = model.embed.weight
    assert emb.shape[0] == 1024 and torch.all(emb[1000:] == 0)  # padding rows stay zero


def test_tied_and_untied_heads():
    gpt = build("tiny-gpt3")
    assert gpt.lm_head is None and gpt.output_weight() is gpt.embed.weight
    llama = build("tiny-llama")
    assert llama.lm_head is not None and llama.pos_embed is None
    names = {n for n, _ in llama.named_parameters()}
    assert not any("bias" in n for n in names)


def test_bf16_forward_backward():
    model = GPTModel(ModelConfig.from_preset("tiny-llama"), seed=1, dtype=torch.bfloat16)
    tokens = torch.randint(0, 1000, (2, 12))
    loss = model(tokens[:, :-1], labels=tokens[:, 1:])
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())
