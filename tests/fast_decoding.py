"""Shared pieces of the fast-decoding tests: a tiny model briefly trained on the bundled corpus
(so logits are peaked like a real model's, not the near-uniform output of random weights), the
corpus windows perplexity is measured on, and per-rank bodies for run_ranks."""
import functools
from pathlib import Path

import numpy as np
import torch

from megatron_ru import GPTModel, ModelConfig, ParallelState

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "data" / "ru_demo_text_document.bin"
VOCAB = 1815  # examples/data/tokenizer
SEQ = 64
# max relative logit error of a quantized model vs fp32, by (method, kernel)
LOGIT_TOL = {("int8", "fbgemm"): 0.12, ("int8", "dequant"): 0.02,
             ("int4", "fbgemm"): 0.25, ("int4", "dequant"): 0.25}
SPARSE = dict(mode="fixed", block=4, num_local_blocks=2, num_global_blocks=1,
              attention="unidirectional", different_layout_per_head=True,
              num_different_global_patterns=2)
FAMILIES = {"gpt3": dict(preset="tiny-gpt3"),
            "llama": dict(preset="tiny-llama", ffn_hidden_size=192),
            "gpt3_sparse": dict(preset="tiny-gpt3", sparse_attention=SPARSE, sparse_mode="alternating")}


def config(family: str) -> ModelConfig:
    kwargs = dict(FAMILIES[family])
    return ModelConfig.from_preset(kwargs.pop("preset"), vocab_size=VOCAB,
                                   max_position_embeddings=SEQ, hidden_dropout=0.0,
                                   attention_dropout=0.0, **kwargs)


def windows() -> torch.Tensor:
    """The corpus cut into (N, SEQ + 1) windows."""
    ids = torch.from_numpy(np.fromfile(CORPUS, dtype=np.uint16).astype(np.int64))
    n = (len(ids) - 1) // SEQ
    return torch.stack([ids[i * SEQ: i * SEQ + SEQ + 1] for i in range(n)])


def train_tiny(family: str = "gpt3", steps: int = 150, seed: int = 3) -> GPTModel:
    """A few seconds of AdamW on the corpus (150 steps of 8 x 64 tokens): the loss falls from
    7.5 to about 4 (perplexity ~65 of 1815 ids), enough for peaked, structured logits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and immune to oversubscription
    try:
        return _train(family, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(family: str, steps: int, seed: int) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(config(family), seed=seed)
    data = windows()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (8,), generator=gen)]
        loss = model(batch[:, :-1], labels=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@functools.lru_cache(maxsize=None)
def trained_state(family: str) -> dict:
    """train_tiny's weights, trained once per test process (tests load them into fresh models)."""
    return {k: v.clone() for k, v in train_tiny(family).state_dict().items()}


def trained_model(family: str) -> GPTModel:
    model = GPTModel(config(family), seed=0)
    model.load_state_dict(trained_state(family))
    return model.eval()


@torch.no_grad()
def perplexity(model) -> float:
    data = windows()
    losses = [float(model(b[:, :-1], labels=b[:, 1:])) for b in data.split(16)]
    return float(np.exp(np.mean(losses)))
