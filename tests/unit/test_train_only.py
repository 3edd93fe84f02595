"""--train-only (training/train_only.py): what is frozen, the row mask, the optimizer groups, bad flags."""
import argparse

import pytest
import torch

from megatron_ru import GPTModel, ModelConfig
from megatron_ru.config import ConfigError
from megatron_ru.training import train_only
from megatron_ru.training.optim import param_groups


def _args(mode, first=None, lora=0):
    return argparse.Namespace(train_only=mode, train_only_from=first, lora_rank=lora,
                              pipeline_model_parallel_size=1)


@pytest.mark.parametrize("family", ["gpt3", "llama"])
def test_embeddings_mode_trains_the_vocabulary_matrices_only(family):
    model = GPTModel(ModelConfig.from_preset(f"tiny-{family}", vocab_size=300), seed=1)
    train_only.apply(model, _args("embeddings"), [None], lambda m: None)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == ({"embed.weight"} if family == "gpt3" else {"embed.weight", "lm_head.weight"})
    groups = param_groups(model, 0.1)
    assert sum(len(g["params"]) for g in groups) == len(trained) and groups[0]["weight_decay"] == 0.1


def test_new_rows_mode_masks_old_rows_and_skips_decay(tmp_path):
    model = GPTModel(ModelConfig.from_preset("tiny-llama", vocab_size=300), seed=1)
    train_only.apply(model, _args("new-rows", 250), [None], lambda m: None)
    model(torch.randint(0, 300, (2, 16))).float().pow(2).mean().backward()
    for p in (model.embed.weight, model.lm_head.weight):
        assert not p.grad[:250].any() and p.grad[250:300].abs().sum() > 0
    assert param_groups(model, 0.1)[0]["params"] == []  # no decay on the masked matrices
    with pytest.raises(ConfigError, match="no first new token id"):
        train_only.apply(GPTModel(ModelConfig.from_preset("tiny-llama", vocab_size=300)),
                         _args("new-rows"), [tmp_path], lambda m: None)


def test_bad_flags():
    for args, msg in ((_args(None, 5), "needs --train-only new-rows"), (_args("embeddings", 5), "applies to"),
                      (_args("embeddings", lora=4), "--lora-rank")):
        with pytest.raises(ConfigError, match=msg):
            train_only.validate(args)


def test_new_rows_record_with_replaced_ids_travels(tmp_path):
    """The record of a checkpoint (adapt_vocab's, or a training checkpoint's) gives the trainable rows:
    ids from the first new one on, and the reused ids of removed tokens; apply returns it to carry on."""
    import json
    rec = {"first_new_id": 280, "replaced_ids": [7, 100], "init": "mean"}
    (tmp_path / "config.json").write_text(json.dumps({"format": "megatron_ru", "vocab_adaptation": rec}))
    model = GPTModel(ModelConfig.from_preset("tiny-gpt3", vocab_size=300), seed=1)
    assert train_only.apply(model, _args("new-rows"), [None, tmp_path], lambda m: None) == rec
    model(torch.randint(0, 300, (2, 16))).float().pow(2).mean().backward()
    g = model.embed.weight.grad
    trained = torch.zeros(g.shape[0], dtype=torch.bool)
    trained[[7, 100]] = True
    trained[280:300] = True
    assert not g[~trained].any() and bool((g[trained].abs().sum(1) > 0).all())
    assert train_only.apply(model, _args(None), [tmp_path], lambda m: None) == rec  # carried by any run
    assert train_only.record_for(_args("new-rows", 290), [tmp_path])["first_new_id"] == 290
