"""Packed SFT rows give the same loss as one conversation per row (dense, block-sparse, GQA), and
the step loss is the mean over the global batch's target tokens whatever the micro-batching."""
import numpy as np
import pytest
import torch

from megatron_ru import GPTModel, ModelConfig, ParallelState
from megatron_ru.data.indexed_dataset import IndexedDatasetBuilder
from megatron_ru.data.sft_examples import SFTDataset, mask_prefix, sft_batch
from megatron_ru.training.finetune import GlobalTokenMean, forward
from tests.helpers import assert_rel_close

SPARSE = {"mode": "fixed", "block": 4, "different_layout_per_head": True, "num_local_blocks": 2,
          "num_global_blocks": 1, "attention": "unidirectional", "horizontal_global_attention": False,
          "num_different_global_patterns": 2}
MODELS = {
    "gpt3-dense": dict(family="gpt3", num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=90,
                       max_position_embeddings=64),
    "gpt3-sparse": dict(family="gpt3", num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=90,
                        max_position_embeddings=64, sparse_attention=SPARSE, sparse_mode="alternating"),
    "llama-gqa": dict(family="llama", num_layers=2, hidden_size=32, num_attention_heads=4,
                      num_key_value_heads=2, ffn_hidden_size=48, vocab_size=90, max_position_embeddings=64),
}
SEQ = 47


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Twelve conversations of 6..30 tokens; random 0/1 targets."""
    prefix = str(tmp_path_factory.mktemp("sft") / "conv")
    rng = np.random.RandomState(0)
    with IndexedDatasetBuilder(prefix, np.int32) as ids, IndexedDatasetBuilder(mask_prefix(prefix), np.uint8) as m:
        for _ in range(12):
            n = rng.randint(6, 31)
            ids.add_document(rng.randint(1, 90, n))
            m.add_document((rng.rand(n) < 0.6).astype(np.uint8))
    return prefix


def rows(pair, packing):
    ds = SFTDataset(pair, np.arange(12), name="train", seq_length=SEQ, num_samples=None, seed=3, packing=packing)
    return {k: np.stack([ds[i][k] for i in range(len(ds))]) for k in ("text", "loss_mask", "segment")}, len(ds)


def token_loss_sum(model, batch):
    loss = model(batch["tokens"], positions=batch["position_ids"], labels=batch["labels"],
                 loss_mask=batch["loss_mask"], attention_mask=batch["attention_mask"])
    return loss * batch["loss_mask"].sum()


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_equals_one_conversation_per_row(pair, name):
    model = GPTModel(ModelConfig(**MODELS[name]), ParallelState.single(), seed=1)
    padded, n_pad = rows(pair, "pad")
    packed, n_packed = rows(pair, "packed")
    assert n_pad == 12 and n_packed < 8
    a = sft_batch(padded, packed=False)
    b = sft_batch(packed, packed=True)
    assert a["loss_mask"].sum() == b["loss_mask"].sum()
    loss_a = token_loss_sum(model, a)
    loss_b = token_loss_sum(model, b)
    assert_rel_close(loss_b, loss_a, 1e-5, f"{name} summed token loss")
    grads = []
    for loss in (loss_a, loss_b):
        model.zero_grad()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert_rel_close(grads[1][n], grads[0][n], 1e-4, f"{name} grad {n}")


def test_global_token_mean_is_independent_of_micro_batching(pair):
    """accum micro-batches of uneven target counts: the weighted losses, averaged as DeepSpeed
    does (divide by accum), equal the mean over all targets of the step."""
    model = GPTModel(ModelConfig(**MODELS["gpt3-dense"]), ParallelState.single(), seed=1)
    padded, _ = rows(pair, "pad")
    whole = sft_batch(padded, packed=False)
    reference = token_loss_sum(model, whole) / whole["loss_mask"].sum()
    for accum in (2, 3, 4):
        micro = [{k: v[i::accum] for k, v in padded.items()} for i in range(accum)]
        stream = GlobalTokenMean(iter(micro), accum, ParallelState.single(), packed=False)
        step = sum(forward(model, next(stream), torch.device("cpu")) for _ in range(accum)) / accum
        assert_rel_close(step, reference, 1e-6, f"accum {accum}")
