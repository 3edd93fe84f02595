"""Per-rank bodies of the generation tests (run under tests.helpers.run_ranks, gloo on CPU)."""
import torch

from megatron_ru import GPTModel, ModelConfig, ParallelState
from megatron_ru.inference import Generator, SamplingParams
from tests.distributed.workers import MODEL_CONFIGS
from tests.helpers import assert_rel_close

# Prompts of different lengths: the batch exercises padding and per-row positions.
PROMPTS = [[5, 17, 300, 42, 9, 77, 123], [800, 2, 64], [11, 12, 13, 14, 15]]
SAMPLING = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2)


def tp_sampling_equals_tp1(rank, world):
    """The same seed gives the same samples at TP=world as at TP=1, on every rank; the logits
    each token was drawn from agree to fp32 rounding. Only TP rank 0 is given a seed: the
    others must get their tokens from the broadcast."""
    ps = ParallelState.from_environment(tensor_model_parallel_size=world)
    torch.manual_seed(100 + rank)  # ranks' default streams differ on purpose
    for family, kwargs in MODEL_CONFIGS.items():
        cfg = ModelConfig(**{**kwargs, "init_method_std": 0.1})
        tp_gen = Generator(GPTModel(cfg, ps, seed=5), eod=7)
        ref_gen = Generator(GPTModel(cfg, None, seed=5), eod=7)
        got = tp_gen.generate(PROMPTS, max_new_tokens=12, sampling=SAMPLING,
                              seed=1234 if ps.tp_rank == 0 else None, keep_logits=True)
        ref = ref_gen.generate(PROMPTS, max_new_tokens=12, sampling=SAMPLING, seed=1234,
                               keep_logits=True)
        for i, (g, r) in enumerate(zip(got, ref)):
            assert g.tokens == r.tokens and g.finish_reason == r.finish_reason, (family, i)
            assert len(g.tokens) > 0, (family, i)
            assert_rel_close(g.logits, r.logits, 1e-5, f"{family} row {i} logits")
        distinct = {t for c in got for t in c.tokens}
        assert len(distinct) > 5, f"{family}: samples are suspiciously uniform: {distinct}"


def save_demo_checkpoint(rank, world, directory, vocab_size):
    """A tiny ruGPT-3 with the demo tokenizer's vocabulary, written at TP=world."""
    from megatron_ru.checkpoint.model_io import save_model
    ps = ParallelState.from_environment(tensor_model_parallel_size=world)
    cfg = ModelConfig.from_preset("tiny-gpt3", vocab_size=vocab_size, init_method_std=0.2,
                                  max_position_embeddings=64)
    save_model(directory, GPTModel(cfg, ps, seed=3), tag="iter_0000010")
