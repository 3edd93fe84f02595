"""Per-rank bodies of the context-parallel tests (gloo on CPU, fp32, dropout 0).

Every rank builds the one-process reference from the same seed and feeds it the whole
sequences, while the CP model gets this rank's slice (parallel/context.py `local_slice`). The
model's gradients summed over the CP group and divided by CP (what DeepSpeed's DP x CP average
does) must equal the reference's, and so must the losses of several DeepSpeed steps (ZeRO 0, 3).
"""
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ru import GPTModel, ModelConfig, ParallelState
from megatron_ru.parallel.context import local_slice
from megatron_ru.parallel.sharding import shard
from tests.helpers import assert_rel_close

TOL = 1e-6
# SGD: gradients that differ by rounding stay so (Adam amplifies near-zero ones); clipping on
# (DeepSpeed's default 1.0 too): the global gradient norm must agree as well
LR, CLIP = 0.5, 1.0
SEQ, BATCH, VOCAB = 32, 2, 300
SPARSE = dict(mode="fixed", block=4, num_local_blocks=4, num_global_blocks=1,
              attention="unidirectional", different_layout_per_head=True,
              num_different_global_patterns=4)
CONFIGS = {  # 32 tokens = 8 blocks of 4: local windows, global columns and skipped blocks
    "gpt3_sparse": dict(family="gpt3", num_layers=2, hidden_size=64, num_attention_heads=4,
                        sparse_mode="alternating", sparse_attention=SPARSE),
    "llama_gqa": dict(family="llama", num_layers=2, hidden_size=64, num_attention_heads=8,
                      num_key_value_heads=4, ffn_hidden_size=96),
    "llama_gqa_sparse": dict(family="llama", num_layers=2, hidden_size=64, num_attention_heads=8,
                             num_key_value_heads=4, ffn_hidden_size=96, sparse_mode="all",
                             sparse_attention=SPARSE, checkpoint_activations=True),
}


def _config(name):
    """CONFIGS[name]; "NAME+sp": with Megatron sequence parallelism (TP > 1: each CP slice is
    split again over the TP ranks outside attention and MLP)."""
    base, _, sp = name.partition("+")
    return ModelConfig(**CONFIGS[base], vocab_size=VOCAB, max_position_embeddings=SEQ,
                       hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05,
                       sequence_parallel=sp == "sp")


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    mask = (torch.rand(BATCH, SEQ, generator=g) > 0.3).float()  # uneven per CP slice
    return text[:, :-1], text[:, 1:], mask


def _expected(name, p, grad, ref_grad, ps, vocab_start):
    """The reference gradient for `grad`, this rank's (full, unpartitioned) TP shard's gradient."""
    if name in ("embed.weight", "lm_head.weight"):  # vocabulary rows, padded per TP size
        out = torch.zeros_like(grad)
        real = max(0, min(vocab_start + grad.shape[0], VOCAB) - vocab_start)
        out[:real] = ref_grad[vocab_start:vocab_start + real]
        return out
    return shard(ref_grad, getattr(p, "shard_spec", None), ps.tp_rank, ps.tp_size)


def _local(ps, *tensors):
    return [local_slice(t, ps) for t in tensors]


def model_parity(rank, world, tp, cp, names=tuple(CONFIGS)):
    """Loss and every gradient of one forward/backward (default: all three configs)."""
    ps = ParallelState.from_environment(tensor_model_parallel_size=tp, context_parallel_size=cp)
    assert (ps.cp_rank, ps.tp_rank) == ((rank // tp) % cp, rank % tp)
    for name in names:
        cfg = _config(name)
        model, ref = GPTModel(cfg, ps, seed=5), GPTModel(cfg, None, seed=5)
        tokens, labels, mask = _batch(seed=1)
        loss = model(*_local(ps, tokens), labels=local_slice(labels, ps),
                     loss_mask=local_slice(mask, ps))
        assert model._sp_active == (cfg.sequence_parallel and tp > 1), name
        ref_loss = ref(tokens, labels=labels, loss_mask=mask)
        assert_rel_close(loss, ref_loss, TOL, f"{name} loss")
        loss.backward()
        ref_loss.backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        for pname, p in model.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad, group=ps.cp_group)
            expected = _expected(pname, p, grad, ref_grads[pname], ps, model.vocab_start)
            assert_rel_close(grad / cp, expected, TOL, f"{name} {pname} grad")


def _ds_engine(model, ps, stage, lr, adamw=False, **extra):
    import deepspeed

    from megatron_ru.training.optim import param_groups

    ds = {"train_batch_size": BATCH * ps.dp_cp_size, "train_micro_batch_size_per_gpu": BATCH,
          "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
          "gradient_clipping": CLIP,
          "steps_per_print": 10**9, "zero_allow_untested_optimizer": True, **extra}
    if stage == 3:
        for p in {id(model.embed.weight): model.embed.weight,
                  id(model.output_weight()): model.output_weight()}.values():
            deepspeed.zero.register_external_parameter(model, p)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=lr) if adamw else \
        torch.optim.SGD(model.parameters(), lr=lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, mpu=ps)
    return engine


def universal_resume(ps, directory):
    """ZeRO-3, AdamW with two parameter groups (decay / none), CP ranks in DeepSpeed's
    data-parallel group: the state saved at step 2, converted to DeepSpeed's universal form and
    loaded by a fresh engine (checkpoint/training.py) gives the next two steps bit for bit.
    (DeepSpeed 0.19's stage-3 loader alone shares one Adam `step` between the groups and gives
    every group the first one's settings: the second resumed loss already differs.)"""
    from deepspeed.utils import safe_get_full_fp32_param

    from megatron_ru.checkpoint import universal
    from megatron_ru.checkpoint.training import load_training_checkpoint, save_training_checkpoint

    cfg = _config("gpt3_sparse")
    a = _ds_engine(GPTModel(cfg, ps, seed=5), ps, 3, lr=1e-2, adamw=True)

    def step(engine, i):
        tokens, labels, mask = _batch(seed=500 + 10 * i + ps.dp_rank)
        loss = engine(*_local(ps, tokens), labels=local_slice(labels, ps), loss_mask=local_slice(mask, ps))
        engine.backward(loss)
        engine.step()
        return loss.item()

    for i in range(2):
        step(a, i)
    save_training_checkpoint(a, directory, 2, {"iteration": 2}, cfg, ps)
    if ps.rank == 0:
        universal.convert(Path(directory) / "iter_0000002", Path(directory) / "u", progress=False)
    dist.barrier()
    b = _ds_engine(GPTModel(cfg, ps, seed=6), ps, 3, lr=1e-2, adamw=True,
                   checkpoint={"load_universal": True})
    load_training_checkpoint(b, directory, load_optimizer=True, tag="u")
    assert [step(b, i) for i in (2, 3)] == [step(a, i) for i in (2, 3)]
    for (name, p), q in zip(a.module.named_parameters(), b.module.parameters()):
        assert torch.equal(safe_get_full_fp32_param(p), safe_get_full_fp32_param(q)), name


def deepspeed_parity(rank, world, tp, cp, stages, names):
    """DeepSpeed with ParallelState as its `mpu` (data-parallel group = DP x CP): the gradients
    after one step and the losses of 4 SGD steps equal one process's, at each ZeRO stage.
    Each DP rank takes its own micro-batch; the reference averages them."""
    from deepspeed.utils import safe_get_full_grad

    ps = ParallelState.from_environment(tensor_model_parallel_size=tp, context_parallel_size=cp)
    for stage in stages:
        for name in names:
            cfg = _config(name)
            ref = GPTModel(cfg, None, seed=5)
            ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
            engine = _ds_engine(GPTModel(cfg, ps, seed=5), ps, stage, lr=LR)
            vocab_start = engine.module.vocab_start
            for step in range(4):
                batches = [_batch(seed=100 * step + d) for d in range(ps.dp_size)]
                tokens, labels, mask = batches[ps.dp_rank]
                loss = engine(*_local(ps, tokens), labels=local_slice(labels, ps),
                              loss_mask=local_slice(mask, ps))
                engine.backward(loss)
                ref_opt.zero_grad()
                ref_losses = [ref(t, labels=l, loss_mask=m) for t, l, m in batches]
                (sum(ref_losses) / len(batches)).backward()
                ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
                torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
                mean = torch.tensor([loss.item()], dtype=torch.float64)
                dist.all_reduce(mean, group=ps.dp_group)  # the trainer's reported loss
                ref_mean = sum(x.item() for x in ref_losses) / len(batches)
                assert abs(mean.item() / ps.dp_size - ref_mean) <= TOL * ref_mean, \
                    (name, stage, step, mean.item() / ps.dp_size, ref_mean)
                if step == 0:
                    for pname, p in engine.module.named_parameters():
                        grad = safe_get_full_grad(p)
                        expected = _expected(pname, p, grad, ref_grads[pname], ps, vocab_start)
                        assert_rel_close(grad, expected, TOL, f"ZeRO-{stage} {name} {pname} grad")
                engine.step()
                ref_opt.step()
            dist.barrier()


def bf16_smoke(ps):
    """bf16 weights and activations (the all-to-alls carry bf16): three SGD steps on one batch
    give finite gradients, falling losses, each within 1e-2 of the fp32 one-process run's."""
    cfg = _config("llama_gqa")
    tokens, labels, mask = _batch(seed=1)
    runs = {}
    for name, model in (("bf16", GPTModel(cfg, ps, seed=5, dtype=torch.bfloat16)),
                        ("ref", GPTModel(cfg, None, seed=5))):
        cp = ps.cp_size if name == "bf16" else 1
        runs[name] = []
        for _ in range(3):
            model.zero_grad()
            if name == "bf16":
                loss = model(*_local(ps, tokens), labels=local_slice(labels, ps),
                             loss_mask=local_slice(mask, ps))
            else:
                loss = model(tokens, labels=labels, loss_mask=mask)
            loss.backward()
            runs[name].append(loss.item())
            with torch.no_grad():
                for p in model.parameters():
                    assert torch.isfinite(p.grad).all() and p.grad.dtype == p.dtype
                    grad = p.grad.float()
                    if cp > 1:
                        dist.all_reduce(grad, group=ps.cp_group)
                    p -= (0.03 / cp * grad).to(p.dtype)  # DeepSpeed's average over CP
    bf16, ref = runs["bf16"], runs["ref"]
    assert bf16[0] > bf16[1] > bf16[2], bf16
    assert all(abs(x - y) <= 1e-2 * y for x, y in zip(bf16, ref)), (bf16, ref)


def checks(rank, world, tp, cp, with_model, stages, names, universal_dir=None):
    """One spawn for several checks (process start-up and DeepSpeed import dominate).
    with_model: True (all configs) or the config names to check without DeepSpeed."""
    if with_model:
        model_parity(rank, world, tp, cp, *(() if with_model is True else (with_model,)))
    if stages:
        deepspeed_parity(rank, world, tp, cp, stages, names)
    if universal_dir is not None:
        bf16_smoke(ParallelState.from_environment(tensor_model_parallel_size=tp,
                                                  context_parallel_size=cp))
        universal_resume(ParallelState.from_environment(tensor_model_parallel_size=tp,
                                                        context_parallel_size=cp), universal_dir)
