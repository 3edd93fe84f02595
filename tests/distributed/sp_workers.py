"""Per-rank bodies of the sequence-parallel tests (gloo on CPU, fp32, dropout 0).

TP=world with --sequence-parallel against TP=world without it and against the single-process
model built from the same seed: the loss and every gradient after one step, both families,
alternating block-sparse layers with activation checkpointing, packed rows (per-document
positions and attention mask), LoRA; then DeepSpeed engines at ZeRO 0-3: ten steps' losses equal
the plain TP run's, and after 20 steps the replicated parameters (norms, biases, position table)
are bit-identical on every TP rank (bf16 at ZeRO-3 too).
"""
import copy

import torch
import torch.distributed as dist

from megatron_ru import GPTModel, ModelConfig, ParallelState
from megatron_ru.model.lora import adapter_parameters, apply_lora
from megatron_ru.parallel.sharding import shard
from tests.helpers import assert_rel_close

TOL = 1e-6
SEQ, BATCH, VOCAB = 16, 2, 300
CONFIGS = {
    "gpt3": dict(family="gpt3", num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                 max_position_embeddings=32, make_vocab_size_divisible_by=32),
    "llama": dict(family="llama", num_layers=2, hidden_size=32, num_attention_heads=4,
                  num_key_value_heads=2, ffn_hidden_size=48, vocab_size=VOCAB,
                  max_position_embeddings=32, make_vocab_size_divisible_by=32),
    # alternating block-sparse layers (the sequence crosses 4 blocks) + activation checkpointing
    "llama_sparse_ckpt": dict(family="llama", num_layers=2, hidden_size=32, num_attention_heads=4,
                              num_key_value_heads=2, ffn_hidden_size=48, vocab_size=VOCAB,
                              max_position_embeddings=32, make_vocab_size_divisible_by=32,
                              checkpoint_activations=True, sparse_mode="alternating",
                              sparse_attention=dict(mode="fixed", block=4, num_local_blocks=2,
                                                    num_global_blocks=1, attention="unidirectional",
                                                    different_layout_per_head=True,
                                                    num_different_global_patterns=2)),
}


def _batch(seed, packed=False):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    out = {"tokens": text[:, :-1], "labels": text[:, 1:],
           "loss_mask": (torch.rand(BATCH, SEQ, generator=g) > 0.2).float()}
    if packed:  # two documents per row, split at 5 and 11: positions restart, no cross attention
        doc = torch.tensor([0] * 5 + [1] * 6 + [2] * 5).expand(BATCH, SEQ)
        starts = torch.tensor([0] * 5 + [5] * 6 + [11] * 5)
        out["positions"] = (torch.arange(SEQ) - starts).expand(BATCH, SEQ)
        causal = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool))
        out["attention_mask"] = ~(causal & (doc[:, :, None] == doc[:, None, :]))[:, None]
    return out


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _expected(name, p, ref_grad, model, ps):
    """The slice of the single-process gradient this rank's parameter should have."""
    if name in ("embed.weight", "lm_head.weight"):  # vocabulary rows, padded per TP size
        start, n = model.vocab_start, p.shape[0]
        full = torch.zeros(model.padded_vocab_size, *ref_grad.shape[1:])
        real = min(ref_grad.shape[0], model.padded_vocab_size)
        full[:real] = ref_grad[:real]
        return full[start:start + n]
    return shard(ref_grad, getattr(p, "shard_spec", None), ps.tp_rank, ps.tp_size)


def grads_match(rank, world):
    """One step: loss and every gradient of TP+SP equal TP's and the single process's (1e-6)."""
    ps = ParallelState.from_environment(tensor_model_parallel_size=world)
    cases = [(name, False, 0) for name in CONFIGS] + [("gpt3", True, 0), ("llama", False, 4)]
    for name, packed, lora in cases:
        what = f"{name}{' packed' if packed else ''}{' lora' if lora else ''}"
        cfg = ModelConfig(**CONFIGS[name])
        sp_cfg = copy.deepcopy(cfg)
        sp_cfg.sequence_parallel = True
        ref, tp, sp = GPTModel(cfg, None, seed=5), GPTModel(cfg, ps, seed=5), GPTModel(sp_cfg, ps, seed=5)
        if lora:  # B starts at zero: random values (the full tensor, sliced) make it matter
            for m in (ref, tp, sp):
                apply_lora(m, rank=lora, alpha=8.0, targets="qkv,proj,fc1,fc2,lm_head", seed=2)
            gen = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for (n, rp), (_, p), (_, q) in zip(adapter_parameters(ref), adapter_parameters(tp),
                                                   adapter_parameters(sp)):
                    if n.endswith(".B"):
                        rp.copy_(torch.randn(rp.shape, generator=gen) * 0.1)
                        p.copy_(shard(rp, p.shard_spec, ps.tp_rank, world))
                        q.copy_(p)
        assert sp.sequence_parallel and not tp.sequence_parallel
        batch = _batch(seed=1, packed=packed)
        ref_loss, ref_grads = _loss_and_grads(ref, batch)
        tp_loss, tp_grads = _loss_and_grads(tp, batch)
        sp_loss, sp_grads = _loss_and_grads(sp, batch)
        assert_rel_close(sp_loss, ref_loss, TOL, f"{what} loss vs TP1")
        assert_rel_close(sp_loss, tp_loss, TOL, f"{what} loss vs TP{world}")
        assert set(sp_grads) == set(tp_grads) == set(ref_grads), what
        params = dict(sp.named_parameters())
        for n, g in sp_grads.items():
            assert_rel_close(g, tp_grads[n], TOL, f"{what} {n} grad vs TP{world}")
            assert_rel_close(g, _expected(n, params[n], ref_grads[n], sp, ps), TOL, f"{what} {n} grad vs TP1")
        # sampling ignores the flag: without autograd (any length), in eval mode and with the KV
        # cache the model runs the plain TP path
        with torch.no_grad():
            assert torch.equal(sp(batch["tokens"][:, :15]), tp(batch["tokens"][:, :15])), what
        sp.eval()
        tp.eval()
        with torch.no_grad():
            tokens = batch["tokens"]
            assert torch.equal(sp(tokens), tp(tokens)), what
            cache = sp.new_cache(BATCH, 32)
            sp(tokens[:, :7], cache=cache)
            step = sp(tokens[:, 7:8], cache=cache)
            assert_rel_close(sp.gather_logits(step), tp.gather_logits(tp(tokens[:, :8])[:, 7:8]),
                             1e-5, f"{what} KV-cache decode")
        dist.barrier()


def _engine(cfg, ps, stage, precision, seed=5):
    import deepspeed

    model = GPTModel(cfg, ps, seed=seed)
    ds = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH,
          "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "steps_per_print": 10**9,
          "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    if stage == 3:
        for p in (model.embed.weight, model.output_weight()):
            deepspeed.zero.register_external_parameter(model, p)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds, mpu=ps)
    return model, engine


def _replicated(model):
    """name → full fp32 copy of every parameter that is not split over TP (ZeRO-3 gathered)."""
    import deepspeed

    out = {}
    for n, p in model.named_parameters():
        if getattr(p, "shard_spec", None) is None:
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                out[n] = p.detach().clone().float()
    return out


def engines_match(rank, world, cases):
    """DeepSpeed at each ZeRO stage: TP+SP losses of 10 steps equal TP's (fp32: 1e-6, bf16: 2e-3);
    after 20 steps norm weights, biases and the position table are bit-identical on every TP rank."""
    ps = ParallelState.from_environment(tensor_model_parallel_size=world)
    for stage, family, precision in cases:
        tol = TOL if precision == "fp32" else 2e-3
        cfg = ModelConfig(**CONFIGS[family])
        sp_cfg = copy.deepcopy(cfg)
        sp_cfg.sequence_parallel = True
        runs = {}
        for label, c in (("tp", cfg), ("sp", sp_cfg)):
            ps.seed(7)
            model, engine = _engine(c, ps, stage, precision)
            losses = []
            for step in range(20):
                loss = engine(**_batch(seed=100 + step % 2))
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            runs[label] = (losses, _replicated(model))
        tp_losses, sp_losses = runs["tp"][0], runs["sp"][0]
        for i in range(10):
            assert abs(sp_losses[i] - tp_losses[i]) <= tol * abs(tp_losses[i]), \
                (stage, family, precision, i, sp_losses[:10], tp_losses[:10])
        assert sp_losses[-1] < sp_losses[0], sp_losses
        replicated = runs["sp"][1]
        assert any(n.endswith("norm1.weight") for n in replicated), sorted(replicated)
        for n, w in replicated.items():
            others = [torch.empty_like(w) for _ in range(world)]
            dist.all_gather(others, w, group=ps.tp_group)
            assert all(torch.equal(o, w) for o in others), \
                f"ZeRO {stage} {family} {precision}: {n} differs across TP ranks"
        dist.barrier()
