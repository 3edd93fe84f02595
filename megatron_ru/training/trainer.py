"""Trainer: the pretraining loop around the DeepSpeed engine — data, steps, eval, logs, checkpoints."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import runtime
from ..arguments import TrainArgs, model_config
from ..checkpoint import training as ckpt
from ..checkpoint.model_io import load_full_state_dict, shard_state_dict
from ..data import build_train_valid_test_datasets
from ..data.batch import build_data_loader, get_batch
from ..data.tokenizers import build_tokenizer
from ..model.gpt import GPTModel
from ..parallel.state import ParallelState
from . import ds_config
from .metrics import MetricsSink, device_peak_tflops, flops_per_token, memory_gb
from .optim import LRSchedule, ScheduledLR, param_groups


def _loss_scale(optimizer) -> Optional[float]:
    for obj in (optimizer, getattr(optimizer, "loss_scaler", None)):
        for attr in ("cur_scale", "loss_scale"):
            value = getattr(obj, attr, None) if obj is not None else None
            if isinstance(value, (int, float)) or torch.is_tensor(value):
                return float(value)
    return None


def tp_grad_norm(model: GPTModel, ps: ParallelState) -> float:
    """Global L2 norm of the (DP-averaged) gradients: sharded parameters summed over the TP
    group, replicated ones counted once."""
    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "shard_spec", None) is not None or ps.tp_rank == 0:
            total += p.grad.detach().double().pow(2).sum().cpu()
    if ps.tp_comm is not None:
        dist.all_reduce(total, group=ps.tp_comm)
    return math.sqrt(total.item())


def rank0_first(ps: ParallelState, build: Callable):
    """Run `build` on rank 0 (which fills caches), then on the others; a failure on any rank
    stops every rank together (`runtime.agree`), reported once, instead of peers waiting."""
    error, result = None, None
    if ps.rank == 0:
        try:
            result = build()
        except Exception as exc:  # noqa: BLE001 - shared with every rank by agree()
            error = exc
    runtime.agree(ps, error)
    if ps.rank != 0:
        try:
            result = build()
        except Exception as exc:  # noqa: BLE001
            error = exc
    runtime.agree(ps, error)
    return result


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Trainer:
    """Built from typed args and a ParallelState; `fit()` runs the whole job."""

    def __init__(self, args: TrainArgs, ps: ParallelState, log: Optional[Callable] = None) -> None:
        self.args, self.ps = args, ps
        self.log = log or (lambda msg: print(msg, flush=True) if ps.rank == 0 else None)
        self.iteration = self.consumed = self.consumed_valid = 0
        self.loaded_iteration = None
        self.setup()

    # ---- construction ---------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        args, ps = self.args, self.ps
        self.tokenizer = build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file,
                                         merge_file=args.merge_file,
                                         tokenizer_model=args.tokenizer_model,
                                         eod_token=args.eod_token)
        ds, sparse, self.precision = ds_config.build(args, ps.dp_size, self.log)
        self.ds = ds
        self.config = model_config(args, self.tokenizer.vocab_size, sparse)
        self.config.validate_parallel(ps.tp_size)
        if args.load:
            ckpt.check_compatible(args.load, self.config, ps.tp_size, weights_only=args.finetune)
        self.tokens_per_iter = ds["train_batch_size"] * args.seq_length
        self.flops_per_iter = flops_per_token(self.config, args.seq_length) * self.tokens_per_iter
        self.peak = device_peak_tflops(args.peak_tflops)
        # rank 0 builds (and caches) the indices first; the others then load them
        self.data = rank0_first(ps, lambda: build_train_valid_test_datasets(
            args.data_path, args.split, args.seq_length, args.seed, self._sample_counts(),
            cache_path=args.data_cache_path))
        if self.data[0] is None:
            raise ValueError(f"--split {args.split} leaves no training documents")

        ps.seed(args.seed)
        model = GPTModel(self.config, ps, seed=args.seed)
        if args.finetune:  # weights only, from any TP size
            _, full = load_full_state_dict(Path(args.load))
            model.load_state_dict(shard_state_dict(full, model))
            self.log(f"loaded weights from {args.load} (--finetune: iteration, optimizer and data "
                     "position start fresh)")
        self.model = model
        if self.precision == "fp16" and ps.device.type == "cpu" and \
                not get_accelerator().is_fp16_supported():
            # DeepSpeed refuses fp16 on CPUs without native fp16 arithmetic; PyTorch emulates it
            # (slowly), which is what CPU tests of loss scaling need.
            get_accelerator().is_fp16_supported = lambda: True
            self.log("fp16 on a CPU without native fp16 arithmetic: running emulated (slow)")
        optimizer = scheduler = None
        if "optimizer" not in ds:
            offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
            # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised CPU AdamW
            # (decoupled decay, compiled on first use) instead of torch's, unless the JSON
            # allows a client optimizer ("zero_force_ds_cpu_optimizer": false).
            if offload == "cpu" and ds.get("zero_force_ds_cpu_optimizer", True):
                from deepspeed.ops.adam import DeepSpeedCPUAdam as adamw
                extra = {"adamw_mode": True}
            else:
                adamw, extra = torch.optim.AdamW, {}
            optimizer = adamw(param_groups(model, args.weight_decay), lr=args.lr,
                              betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, **extra)
        if "scheduler" not in ds:  # ours, around whichever optimizer DeepSpeed ends up stepping
            scheduler = lambda opt: ScheduledLR(opt, self._schedule())  # noqa: E731
        if ds.get("zero_optimization", {}).get("stage", 0) == 3:
            # weights used outside their own module's forward (tied / untied output head)
            for p in {id(model.embed.weight): model.embed.weight,
                      id(model.output_weight()): model.output_weight()}.values():
                deepspeed.zero.register_external_parameter(model, p)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds, mpu=ps,
            model_parameters=None if optimizer else param_groups(model, args.weight_decay))
        if args.load and not args.finetune:
            client = ckpt.load_training_checkpoint(self.engine, args.load,
                                                   load_optimizer=not args.no_load_optim)
            self.iteration = self.loaded_iteration = int(client.get("iteration", 0))
            self.consumed = int(client.get("consumed_samples", 0))
            self.consumed_valid = int(client.get("consumed_valid_samples", 0))
            if "rng" in client:
                ckpt.set_rng_state(client["rng"], ps)
            self.log(f"resumed from {args.load} at iteration {self.iteration} "
                     f"({self.consumed} samples consumed)")
        self.sink = MetricsSink(args.metrics_file, args.tensorboard_dir, active=ps.rank == 0)
        n = self.config.num_parameters()
        self.log(f"model: {self.config.family}, {n / 1e6:.2f}M parameters, "
                 f"{sum(self.config.sparse_layers())}/{self.config.num_layers} sparse layers; "
                 f"{ps}; precision {self.precision}; ZeRO stage "
                 f"{ds.get('zero_optimization', {}).get('stage', 0)}; global batch "
                 f"{ds['train_batch_size']} = micro {ds['train_micro_batch_size_per_gpu']} x accum "
                 f"{ds['gradient_accumulation_steps']} x DP {ps.dp_size}")

    def _schedule(self) -> LRSchedule:
        a = self.args
        warmup = a.lr_warmup_iters if a.lr_warmup_iters is not None else \
            int((a.lr_warmup_fraction or 0.0) * (a.lr_decay_iters or a.train_iters))
        return LRSchedule(lr=a.lr, min_lr=a.min_lr, warmup=warmup,
                          decay_iters=a.lr_decay_iters or a.train_iters, style=a.lr_decay_style)

    def _sample_counts(self) -> tuple[int, int, int]:
        a, gb = self.args, self.ds["train_batch_size"]
        evals = a.train_iters // a.eval_interval + 1
        return (a.train_iters * gb, evals * a.eval_iters * gb, a.eval_iters * gb)

    def _loader(self, dataset, consumed: int):
        return iter(build_data_loader(dataset, consumed_samples=consumed,
                                      micro_batch_size=self.ds["train_micro_batch_size_per_gpu"],
                                      dp_rank=self.ps.dp_rank, dp_size=self.ps.dp_size,
                                      num_workers=self.args.num_workers, seed=self.args.seed))

    # ---- one forward ----------------------------------------------------------------------
    def _forward(self, batch) -> torch.Tensor:
        a, dev = self.args, self.ps.device
        b = get_batch(batch["text"], self.tokenizer.eod, eod_mask_loss=a.eod_mask_loss,
                      reset_position_ids=a.reset_position_ids,
                      reset_attention_mask=a.reset_attention_mask)
        mask = b["attention_mask"]
        return self.engine(b["tokens"].to(dev),
                           positions=b["position_ids"].to(dev) if a.reset_position_ids else None,
                           labels=b["labels"].to(dev), loss_mask=b["loss_mask"].to(dev),
                           attention_mask=None if mask is None else mask.to(dev))

    def _dp_mean(self, value: float) -> float:
        if self.ps.dp_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.ps.device)
        dist.all_reduce(t, group=self.ps.dp_group)
        return t.item() / self.ps.dp_size

    # ---- the loop -------------------------------------------------------------------------
    def train_step(self, data_iter) -> dict:
        accum = self.engine.gradient_accumulation_steps()
        losses, norm = [], None
        inject = self.iteration + 1 in self.args.debug_inject_overflow_iters
        skipped_before = self.engine.skipped_steps
        for micro in range(accum):
            loss = self._forward(next(data_iter))
            if inject and micro == accum - 1:
                loss = loss * float("inf")  # fault injection for loss-scaling tests
            self.engine.backward(loss)
            if micro == accum - 1 and self.engine.get_global_grad_norm() is None and \
                    self.ds.get("zero_optimization", {}).get("stage", 0) == 0:
                norm = tp_grad_norm(self.model, self.ps)
            self.engine.step()
            losses.append(loss.detach().float().item())
        self.iteration += 1
        self.consumed += self.ds["train_batch_size"]
        gn = self.engine.get_global_grad_norm()
        norm = float(gn) if gn is not None else norm
        return {"loss": self._dp_mean(sum(losses) / len(losses)), "grad_norm": norm,
                "skipped": self.engine.skipped_steps - skipped_before}

    def run(self) -> int:
        """The whole job; returns the exit status."""
        self.fit()
        return 0

    def fit(self) -> list[dict]:
        a = self.args
        data_iter = self._loader(self.data[0], self.consumed)
        history, window, t_start = [], [], time.perf_counter()
        t_last, it_last = t_start, self.iteration
        self.engine.train()
        while self.iteration < a.train_iters:
            window.append(self.train_step(data_iter))
            if self.iteration % a.log_interval == 0 or self.iteration == a.train_iters:
                now = time.perf_counter()
                its = self.iteration - it_last
                record = self._log_record(window, (now - t_last) / its, now - t_start)
                history.append(record)
                window, t_last, it_last = [], now, self.iteration
            if a.eval_iters and self.data[1] is not None and self.iteration % a.eval_interval == 0:
                self.evaluate()
            if a.save and a.save_interval and self.iteration % a.save_interval == 0:
                self.save()
        if a.eval_iters and self.data[1] is not None and self.iteration % a.eval_interval:
            self.evaluate()
        if a.save and (not a.save_interval or self.iteration % a.save_interval) and \
                self.iteration != self.loaded_iteration:  # a resumed run that had nothing to do
            self.save()
        self.sink.close()
        return history

    def _log_record(self, window, sec_per_iter, elapsed) -> dict:
        lr = self.scheduler.get_lr()[0] if self.scheduler else self.optimizer.param_groups[0]["lr"]
        tflops = self.flops_per_iter / sec_per_iter / self.ps.world_size / 1e12
        norms = [w["grad_norm"] for w in window if w["grad_norm"] is not None]
        record = {
            "iteration": self.iteration, "consumed_samples": self.consumed,
            "consumed_tokens": self.consumed * self.args.seq_length,
            "loss": sum(w["loss"] for w in window) / len(window), "lr": lr,
            "grad_norm": norms[-1] if norms else None,
            "loss_scale": _loss_scale(self.engine.optimizer) if self.precision == "fp16" else None,
            "skipped_iters": sum(w["skipped"] for w in window),
            "total_skipped": int(self.engine.skipped_steps),
            "tokens_per_sec": self.tokens_per_iter / sec_per_iter, "tflops": tflops,
            "mfu": tflops / self.peak if self.peak else None, "memory_gb": memory_gb(),
        }
        eta = (self.args.train_iters - self.iteration) * sec_per_iter
        gn = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
        ls = "" if record["loss_scale"] is None else f" | scale {record['loss_scale']:g}"
        mfu = "" if record["mfu"] is None else f" | MFU {100 * record['mfu']:.1f}%"
        self.log(f"iter {self.iteration:6d}/{self.args.train_iters} | loss {record['loss']:.4f} | "
                 f"lr {lr:.3e} | grad norm {gn}{ls} | skipped {record['skipped_iters']} | "
                 f"{record['tokens_per_sec']:,.0f} tok/s | {tflops:.3f} TFLOP/s/dev{mfu} | "
                 f"mem {record['memory_gb']:.2f} GB | ETA {_fmt_time(eta)}")
        self.sink.write(record)
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        a, accum = self.args, self.engine.gradient_accumulation_steps()
        self.engine.eval()
        valid, gb = self.data[1], self.ds["train_batch_size"]
        losses, data_iter = [], None
        for _ in range(a.eval_iters):
            if self.consumed_valid + gb > len(valid):  # sized for the planned evaluations; a
                self.consumed_valid, data_iter = 0, None  # resumed/extended run starts over
            if data_iter is None:
                data_iter = self._loader(valid, self.consumed_valid)
            for _ in range(accum):
                losses.append(self._forward(next(data_iter)).float().item())
            self.consumed_valid += gb
        self.engine.train()
        val = self._dp_mean(sum(losses) / len(losses))
        ppl = math.exp(min(val, 50.0))
        self.log(f"validation at iter {self.iteration} | loss {val:.4f} | perplexity {ppl:.2f}")
        self.sink.write({"iteration": self.iteration, "val_loss": val, "val_ppl": ppl})
        return val

    def save(self) -> None:
        a = self.args
        client = {"iteration": self.iteration, "consumed_samples": self.consumed,
                  "consumed_valid_samples": self.consumed_valid, "rng": ckpt.rng_state(self.ps)}
        files = {"type": a.tokenizer_type, "eod_token": a.eod_token}
        for key in ("vocab_file", "merge_file", "tokenizer_model"):
            if getattr(a, key):
                files[key] = getattr(a, key)
        path = ckpt.save_training_checkpoint(self.engine, a.save, self.iteration, client,
                                             self.config, self.ps, tokenizer_files=files)
        self.log(f"saved checkpoint {path}")
