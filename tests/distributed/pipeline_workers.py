"""Per-rank bodies of the pipeline-parallel tests (gloo on CPU, DeepSpeed's PipelineEngine).

Every rank builds the single-process reference GPTModel from the same seed, runs the same
micro-batches through it, and compares its own stage's (and TP shard's) gradients with the
reference's (also for SFT micro-batches of different target-token counts, weighted to the global
token mean); tied embedding copies are compared across the first and last stage.
"""
import torch
import torch.distributed as dist

from megatron_ru import GPTModel, ModelConfig, ParallelState
from megatron_ru.parallel.sharding import shard
from megatron_ru.training import pipeline_run
from tests.helpers import assert_rel_close

CONFIGS = {
    "gpt3": dict(family="gpt3", num_layers=4, hidden_size=32, num_attention_heads=4,
                 ffn_hidden_size=64, vocab_size=200, max_position_embeddings=32,
                 hidden_dropout=0.0, attention_dropout=0.0),
    "llama": dict(family="llama", num_layers=4, hidden_size=32, num_attention_heads=4,
                  num_key_value_heads=2, ffn_hidden_size=48, vocab_size=200,
                  max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0),
}
MICRO, ACCUM, SEQ = 2, 4, 16


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = torch.randint(0, 200, (MICRO, SEQ + 1), generator=g)
        mask = (torch.rand(MICRO, SEQ, generator=g) > 0.2).float()
        out.append((text[:, :-1], (text[:, 1:], mask)))
    return out


def _engine(cfg, ps, counts, lr):
    import deepspeed

    model = pipeline_run.build_model(cfg, ps, counts, seed=3)
    module = pipeline_run.build_module(model, ps, counts)
    ds = {"train_batch_size": MICRO * ACCUM * ps.dp_size, "train_micro_batch_size_per_gpu": MICRO,
          "gradient_accumulation_steps": ACCUM, "gradient_clipping": 1.0, "steps_per_print": 10**9}
    ds = pipeline_run.pipe_section(cfg, ds)  # sequence parallel: stage outputs sent whole
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=ds)
    pipeline_run.install_clipping(engine, ps)
    return model, engine


def _compare_grad(name, p, grad, ref_grad, cfg, ps, family):
    if name in ("embed.weight", "lm_head.weight"):  # vocabulary rows, padded per TP size
        v_local = p.shape[0]
        start = ps.tp_rank * v_local
        real = max(0, min(start + v_local, cfg.vocab_size) - start)
        assert_rel_close(grad[:real], ref_grad[start:start + real], 1e-5, f"{family} {name} grad")
        return
    spec = getattr(p, "shard_spec", None)
    assert_rel_close(grad, shard(ref_grad, spec, ps.tp_rank, ps.tp_size), 1e-5, f"{family} {name} grad")


def _sft_rows(n, seed):
    """Collated SFT rows (as the SFT dataset gives them): each row one conversation of random
    length padded with segment -1, loss on a random part, so micro-batches hold different
    numbers of target tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        text = torch.randint(0, 200, (MICRO, SEQ + 1), generator=g)
        length = torch.randint(3, SEQ + 2, (MICRO, 1), generator=g)
        pos = torch.arange(SEQ + 1).expand(MICRO, -1)
        segment = torch.where(pos < length, 0, -1)
        mask = (torch.rand(MICRO, SEQ + 1, generator=g) > 0.4).long() * (segment >= 0)
        rows.append({"text": text, "loss_mask": mask, "segment": segment})
    return rows


def _step_grads(engine, model, data_iter):
    """One train_batch; (loss, {name: (param, grad before clipping)})."""
    captured, clip = {}, engine.clip_fp32_gradients

    def snapshot():
        names = {id(p): n for n, p in model.named_parameters() if not p.is_meta}
        for p in engine.module.parameters():
            if p.grad is not None:
                captured[names[id(p)]] = (p, p.grad.detach().clone())
        clip()

    engine.clip_fp32_gradients = snapshot
    try:
        loss = engine.train_batch(data_iter=data_iter)
    finally:
        engine.clip_fp32_gradients = clip
    return float(loss), captured


def _check_sft(cfg, ps, model, engine, family):
    """SFT micro-batches through GlobalTokenMean + PipeSFTBatches: loss and gradients equal one
    process's mean over every target token of the global batch (all micro-batches, DP ranks)."""
    from megatron_ru.data.sft_examples import sft_batch
    from megatron_ru.training.finetune import GlobalTokenMean

    rows = _sft_rows(ACCUM * ps.dp_size, seed=23)
    ref = GPTModel(cfg, None, seed=3)
    total = sum(float(sft_batch(r, packed=False)["loss_mask"].sum()) for r in rows)
    ref_loss = 0.0
    for r in rows:
        b = sft_batch(r, packed=False)
        n = float(b["loss_mask"].sum())
        loss = ref(b["tokens"], labels=b["labels"], loss_mask=b["loss_mask"]) * (n / total)
        loss.backward()
        ref_loss += loss.item()
    mine = iter(rows[ps.dp_rank * ACCUM:(ps.dp_rank + 1) * ACCUM])
    weighted = GlobalTokenMean(mine, ACCUM, ps, packed=False)
    loss, captured = _step_grads(engine, model, pipeline_run.PipeSFTBatches(weighted, ps.device))
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (family, "sft", loss, ref_loss)
    assert captured, family
    for name, (p, grad) in captured.items():
        _compare_grad(name, p, grad, dict(ref.named_parameters())[name].grad, cfg, ps, f"{family} sft")


def grads_and_tied_weights(rank, world, tp, pp, families):
    """One step's gradients (every parameter of every stage) equal the single process's; the
    tied embedding's two copies stay identical over 20 steps (gpt3). A family "NAME+sp" runs
    with sequence parallelism (the reference is the same single process)."""
    ps = ParallelState.from_environment(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    for family in families:
        cfg = ModelConfig(**CONFIGS[family.split("+")[0]], sequence_parallel=family.endswith("+sp"))
        counts = pipeline_run.pipeline.split_layers(cfg, pp, "uniform")
        batches = _batches(ACCUM * ps.dp_size, seed=11)
        # reference: the same micro-batches (all DP ranks' ones), mean loss, one process
        ref = GPTModel(cfg, None, seed=3)
        for tokens, (labels, mask) in batches:
            (ref(tokens, labels=labels, loss_mask=mask) / len(batches)).backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        total = torch.sqrt(sum(g.double().pow(2).sum() for g in ref_grads.values())).item()

        model, engine = _engine(cfg, ps, counts, lr=0.0)
        sp = cfg.sequence_parallel and tp > 1
        assert model._sp_active == sp and engine.is_pipe_partitioned == (tp > 1 and not sp), family
        mine = batches[ps.dp_rank * ACCUM:(ps.dp_rank + 1) * ACCUM]
        loss, captured = _step_grads(engine, model, iter(mine))
        ref_loss = sum(ref(t, labels=l, loss_mask=m).item() for t, (l, m) in batches) / len(batches)
        assert abs(float(loss) - ref_loss) <= 1e-6 * abs(ref_loss), (family, float(loss), ref_loss)
        assert abs(engine.get_global_grad_norm() - total) <= 1e-5 * total, (family, total)
        expected = set(n for n, p in model.named_parameters() if not p.is_meta)
        assert set(captured) == expected and expected, (family, set(captured) ^ expected)
        for name, (p, grad) in captured.items():
            _compare_grad(name, p, grad, ref_grads[name], cfg, ps, family)
        _check_sft(cfg, ps, model, engine, family)  # lr 0: the same weights

        if cfg.tie_word_embeddings:  # 20 steps with a real learning rate: copies stay equal
            model, engine = _engine(cfg, ps, counts, lr=0.5)
            for step in range(20):
                engine.train_batch(data_iter=iter(_batches(ACCUM, seed=100 + step)))
            w = model.embed.weight.detach()
            first = ps.rank - ps.pp_rank * (world // pp)
            last = first + (pp - 1) * (world // pp)
            if ps.rank in (first, last):
                other = torch.empty_like(w)
                peer = last if ps.rank == first else first
                reqs = [dist.isend(w.contiguous(), peer), dist.irecv(other, peer)]
                for r in reqs:
                    r.wait()
                assert torch.equal(w, other), f"tied embedding copies differ on rank {ps.rank}"
            if cfg.sequence_parallel:  # norms and biases saw sequence shards: still equal over TP
                for name, p in model.named_parameters():
                    if not p.is_meta and getattr(p, "shard_spec", None) is None:
                        parts = [torch.empty_like(p) for _ in range(tp)]
                        dist.all_gather(parts, p.detach().contiguous(), group=ps.tp_group)
                        assert all(torch.equal(x, p) for x in parts), f"{name} differs across TP"
        dist.barrier()
