"""Per-rank body of the TP=2 fast-decoding test (run under tests.helpers.run_ranks, gloo on CPU):
quantized TP=2 equals quantized TP=1 (the same shards, quantized the same way), a quantized
checkpoint loads at TP=2, and greedy speculative decoding at TP=2 equals plain greedy at TP=1."""
import torch

from megatron_ru import GPTModel, ParallelState
from megatron_ru.checkpoint.load import load_model
from megatron_ru.inference import Generator
from megatron_ru.inference.quantize import QuantLinear, QuantSpec, quantize
from megatron_ru.inference.quantize_io import load_for_inference
from megatron_ru.inference.speculative import SpeculativeGenerator
from megatron_ru.parallel.sharding import shard
from tests.fast_decoding import config, windows
from tests.helpers import assert_rel_close, rel_err

PROMPTS = [[5, 17, 300, 42, 9, 77, 123], [800, 2, 64], [11, 12, 13, 14, 15], [1]]


def fast_decoding_tp(rank, world, fp_dir, q_dir, int8_tol):
    ps = ParallelState.from_environment(tensor_model_parallel_size=world)
    one = ParallelState.single()
    x = windows()[:4, :-1]
    models = {"gpt3": lambda p: load_model(fp_dir, p),
              "llama": lambda p: GPTModel(config("llama"), p, seed=4)}
    cases = {"gpt3": [("int8", "dequant"), ("int4", "dequant"), ("int8", "fbgemm")],
             "llama": [("int4", "dequant"), ("int4", "fbgemm")]}
    for family, build in models.items():
        for method, kernel in cases[family]:
            tp = quantize(build(ps), method, kernel=kernel, head=True)
            ref = quantize(build(one), method, kernel=kernel, head=True)
            with torch.no_grad():
                got, want = tp.gather_logits(tp(x)), ref(x)
            what = f"{family} {method} {kernel}"
            if kernel == "dequant":  # weight-only numbers: TP changes only summation order
                assert_rel_close(got, want, 1e-5, what)
            else:  # fbgemm quantizes each rank's activation slice with its own range
                assert rel_err(got, want) <= int8_tol[method], what
            full, mine = ref.state_dict(), tp.state_dict()
            for name, module in tp.named_modules():
                if isinstance(module, QuantLinear) and module.kind != "head":
                    for attr, spec in module.shard_specs.items():
                        key = f"{name}.{attr}"
                        if key in full:
                            assert torch.equal(mine[key], shard(full[key], spec, ps.tp_rank,
                                                                world)), key
    # a quantized checkpoint (TP=1 on disk) loads at TP=2 and gives TP=1's logits
    exact = QuantSpec("int4", 32, True, kernel="dequant")  # weight-only numbers, as above
    loaded, ref = load_for_inference(q_dir, ps, spec=exact), load_for_inference(q_dir, one, spec=exact)
    with torch.no_grad():
        assert_rel_close(loaded.gather_logits(loaded(x)), ref(x), 1e-5, "quantized checkpoint")
    # greedy speculative decoding at TP=2 == plain greedy at TP=1 (dense trained, sparse random)
    for family in ("gpt3", "gpt3_sparse"):
        def target(p):
            return load_model(fp_dir, p) if family == "gpt3" else GPTModel(config(family), p, seed=6)
        plain = Generator(target(one), eod=7).generate(PROMPTS, max_new_tokens=14)
        draft = quantize(target(ps), "int4", kernel="dequant")
        spec = SpeculativeGenerator(Generator(target(ps), eod=7), draft, 3)
        got = spec.generate(PROMPTS, max_new_tokens=14)
        for i, (g, w) in enumerate(zip(got, plain)):
            assert (g.tokens, g.finish_reason) == (w.tokens, w.finish_reason), (family, i)
        assert 0 < spec.stats.acceptance_rate < 1 or family == "gpt3_sparse", spec.summary()
