"""Trainer: the pretraining loop around the DeepSpeed engine — data, steps, eval, logs, checkpoints."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import runtime
from ..errors import EXIT_OK
from .arguments import TrainArgs, model_config
from ..config import ConfigError
from ..checkpoint import save_dir, universal
from ..checkpoint import training as ckpt
from ..data import build_train_valid_test_datasets
from ..data.batch import build_data_loader, context_parallel_slice, get_batch
from ..data.tokenizers import build_tokenizer
from ..parallel.context import check_sequence_length
from ..parallel.state import ParallelState
from ..data.validate import tokenizer_files, tokenizer_fingerprint
from . import ds_config, hpz, lifecycle
from ..launch import local_world_size
from .guards import Guards
from .metrics import (MetricsSink, device_peak_tflops, flops_per_token, fmt_time, loss_scale, memory_gb,
                      tp_grad_norm)
from . import engine_setup, finetune, lora_run, pipeline_run, resume


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
        args, ps = self.args, self.ps
        runtime.start_watchdog(args.hang_timeout_minutes)
        self.resume_tag = None  # the checkpoint tag this run resumes from (not with --finetune)
        self.base = None  # whose weights the model starts from (--finetune / --pretrained-checkpoint / LoRA base)
        runtime.checked(ps, self._prepare)  # flags, tokenizer, paths, lock: all ranks agree
        ds = self.ds
        # rank 0 builds (and caches) the indices first; the others then load them
        runtime.heartbeat("checks")
        self.data = rank0_first(ps, self._build_data)  # validated (ids vs vocabulary) before any model
        runtime.heartbeat("data")
        runtime.fault_point("model")
        self.plan_check = engine_setup.plan_check(self)  # predicted memory: warns before the build

        ps.seed(args.seed)
        self.model, self.pipe, self.vocab_record = engine_setup.build_model(self)
        self.engine, self.optimizer, self.scheduler = engine_setup.build_engine(self)
        self.guards = Guards(self)  # non-finite / spike policies, checked resumes
        if self.resume_tag is not None:
            resume.restore(self)  # iteration, data position, RNG, guards' state
        self.sink = MetricsSink(args.metrics_file, args.tensorboard_dir, active=ps.rank == 0,
                                start_iteration=self.iteration)
        if self.sink.dropped:
            self.log(f"{args.metrics_file}: dropped {self.sink.dropped} row(s) after iteration "
                     f"{self.iteration} (written by a run that did not save them)")
        self.task_eval = None
        if args.eval_tasks:  # lm-eval tasks on the live model (megatron_ru/evaluation/)
            from ..evaluation.during_training import TaskEvaluator
            self.task_eval = TaskEvaluator(args.eval_tasks, ps=ps, tokenizer=self.tokenizer,
                                           log=self.log, sink=self.sink, limit=args.eval_tasks_limit,
                                           include_path=args.eval_tasks_include_path)
        n = self.config.num_parameters()
        self.log(f"model: {self.config.family}, {n / 1e6:.2f}M parameters, "
                 f"{sum(self.config.sparse_layers())}/{self.config.num_layers} sparse layers; "
                 f"{ps}; precision {self.precision}; ZeRO stage "
                 f"{ds.get('zero_optimization', {}).get('stage', 0)}; global batch "
                 f"{ds['train_batch_size']} = micro {ds['train_micro_batch_size_per_gpu']} x accum "
                 f"{ds['gradient_accumulation_steps']} x DP {ps.dp_size}")

    def _build_data(self, train_samples: Optional[int] = None):
        """(train, valid, test), every prefix validated against this tokenizer first. The order's
        prefix does not depend on the counts, so a larger `train_samples` only extends it."""
        a = self.args
        runtime.fault_point("data")
        counts = self._sample_counts()
        counts = (max(counts[0], train_samples or 0), *counts[1:])
        fingerprint = tokenizer_fingerprint(tokenizer_files(a.vocab_file, a.merge_file,
                                                            a.tokenizer_model))
        if a.dataset_type == "sft":  # conversations + loss masks (training/finetune.py)
            data = finetune.build_datasets(a, counts, self.tokenizer.pad, vocab_size=self.tokenizer.vocab_size,
                                      tokenizer_fingerprint=fingerprint, cache_path=a.data_cache_path,
                                      warn=self.log)
        else:
            data = build_train_valid_test_datasets(a.data_path, a.split, a.seq_length, a.seed, counts,
                                                   cache_path=a.data_cache_path,
                                                   vocab_size=self.tokenizer.vocab_size,
                                                   tokenizer_fingerprint=fingerprint, warn=self.log,
                                                   data_order=a.data_order)
        if data[0] is None:
            raise ConfigError(f"--split {a.split} leaves no training documents")
        return data

    def ensure_train_samples(self) -> None:
        """Extend the training order when the data position jumped (skipped windows, other batch)."""
        need = self.consumed + max(0, self.args.train_iters - self.iteration) * self.ds["train_batch_size"]
        if need > len(self.data[0]):
            self.data = rank0_first(self.ps, lambda: self._build_data(need))

    def _prepare(self) -> None:
        """Everything that can fail on a user mistake or on one rank's paths, before compute."""
        args, ps = self.args, self.ps
        runtime.fault_point("setup")
        if args.use_checkpoint_args:
            lifecycle.apply_checkpoint_args(args, self.log)
        self.tokenizer = build_tokenizer(args.tokenizer_type, vocab_file=args.vocab_file,
                                         merge_file=args.merge_file,
                                         tokenizer_model=args.tokenizer_model,
                                         eod_token=args.eod_token)
        self.ds, sparse, self.precision = ds_config.build(args, ps.dp_size, self.log)
        ds_path = f"--deepspeed_config {args.deepspeed_config or '<flags>'}"
        self.hpz_groups = hpz.setup(self.ds, ps, ds_path, local_world_size(), self.log)
        hpz.check_quantization(self.ds, ps, ds_path)
        self.config = model_config(args, self.tokenizer.vocab_size, sparse, self.log)
        self.config.validate_parallel(ps.tp_size, ps.cp_size)
        check_sequence_length(args.seq_length, ps.cp_size)
        if ps.cp_size > 1:
            self.log(ps.layout())
        self.pp_counts = None
        if ps.pp_size > 1:
            self.pp_counts = pipeline_run.check(args, self.ds, self.config, ps, self.log)
            self.log(ps.layout() + "\n" + pipeline_run.describe(self.config, self.pp_counts, args, ps))
        self.tokens_per_iter = self.ds["train_batch_size"] * args.seq_length
        self.flops_per_iter = flops_per_token(self.config, args.seq_length) * self.tokens_per_iter
        self.peak = device_peak_tflops(args.peak_tflops)
        self.checkpoint_bytes = save_dir.checkpoint_bytes(
            self.config.num_parameters(), 4 if self.precision == "fp32" else 2)
        if args.lora_rank:  # a LoRA save holds the adapters' state only
            self.checkpoint_bytes = lora_run.lora_checkpoint_bytes(self.config, args)
        lifecycle.check_outputs(args, ps, self.checkpoint_bytes)
        if args.save and ps.rank == 0:  # one owner per save directory, then its leftovers
            self.lock = save_dir.SaveLock(args.save).acquire()
            runtime.on_exit(self.lock.release)
            if self.lock.note:
                self.log(f"note: {self.lock.note}")
            removed = save_dir.remove_leftovers(args.save)
            if removed:
                self.log(f"removed leftovers of an interrupted save in {args.save}: "
                         + ", ".join(removed))
        # the checkpoint this run resumes from / takes weights from (training/resume.py)
        self.resume_tag, self.base = resume.plan(args, ps, self.config, self.ds, self.log)

    def _sample_counts(self) -> tuple[int, int, int]:
        a, gb = self.args, self.ds["train_batch_size"]
        evals = a.train_iters // a.eval_interval + 1
        return (a.train_iters * gb, evals * a.eval_iters * gb, a.eval_iters * gb)

    def _loader(self, dataset, consumed: int):
        it = iter(build_data_loader(dataset, consumed_samples=consumed,
                                    micro_batch_size=self.ds["train_micro_batch_size_per_gpu"],
                                    dp_rank=self.ps.dp_rank, dp_size=self.ps.dp_size,
                                    num_workers=self.args.num_workers, seed=self.args.seed))
        if self.args.dataset_type == "sft":  # loss = mean over the global batch's target tokens
            it = finetune.GlobalTokenMean(it, self.engine.gradient_accumulation_steps(), self.ps,
                                          packed=self.args.sft_packing == "packed")
            if self.ps.pp_size > 1:  # (tokens, (labels, loss_mask, weight)) pairs
                it = pipeline_run.PipeSFTBatches(it, self.ps.device)
        elif self.ps.pp_size > 1:  # DeepSpeed's ((inputs), (labels)) pairs
            it = pipeline_run.PipeBatches(it, self.tokenizer.eod, self.args.eod_mask_loss,
                                          self.ps.device)
        return it

    # ---- one forward ----------------------------------------------------------------------
    def _forward(self, batch) -> torch.Tensor:
        a, dev = self.args, self.ps.device
        if a.dataset_type == "sft":
            return finetune.forward(self.engine, batch, dev)
        b = get_batch(batch["text"], self.tokenizer.eod, eod_mask_loss=a.eod_mask_loss,
                      reset_position_ids=a.reset_position_ids,
                      reset_attention_mask=a.reset_attention_mask)
        b = context_parallel_slice(b, self.ps.cp_rank, self.ps.cp_size)  # CP: this rank's tokens
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
        if self.iteration + 1 in self.args.iterations_to_skip:  # consume the batch, no update
            for _ in range(accum):
                next(data_iter)
            self.iteration += 1
            self.consumed += self.ds["train_batch_size"]
            self.log(f"iteration {self.iteration}: batch skipped (--iterations-to-skip)")
            return {"loss": float("nan"), "grad_norm": None, "skipped": 0, "data_skipped": True}
        if self.ps.pp_size > 1:
            return pipeline_run.train_step(self, data_iter)
        losses, norm = [], None
        inject = self.guards.inject("overflow", self.iteration + 1)
        spike = self.guards.inject("spike", self.iteration + 1)
        skipped_before = self.engine.skipped_steps
        for micro in range(accum):
            loss = self._forward(next(data_iter))
            if inject and micro == accum - 1:
                loss = loss * float("inf")  # fault injection for loss-scaling tests
            loss = loss * 30.0 if spike else loss  # fault injection: a loss spike
            self.engine.backward(loss)
            losses.append(loss.detach().float().item())
            if micro == accum - 1 and self.engine.get_global_grad_norm() is None and \
                    self.ds.get("zero_optimization", {}).get("stage", 0) == 0:
                norm = tp_grad_norm(self.model, self.ps)
                self.guards.before_update(losses, norm)  # fp32 ZeRO-0: skip a non-finite step
            self.guards.engine_step()
        self.iteration += 1
        self.consumed += self.ds["train_batch_size"]
        gn = self.engine.get_global_grad_norm()
        norm = float(gn) if gn is not None else norm
        return {"loss": self._dp_mean(sum(losses) / len(losses)), "grad_norm": norm,
                "skipped": self.engine.skipped_steps - skipped_before}

    def run(self) -> int:
        """The whole job; returns the exit status."""
        self.fit()
        return EXIT_OK

    def fit(self) -> list[dict]:
        a = self.args
        data_iter = self._loader(self.data[0], self.consumed)
        history, window, t_start = [], [], time.perf_counter()
        t_last, it_last = t_start, self.iteration
        stop = lifecycle.StopPolicy(a, self.ps, runtime.started_at())
        saved_at = self.loaded_iteration
        self.engine.train()
        while self.iteration < a.train_iters:
            t_step = time.perf_counter()
            runtime.fault_point("step", self.iteration + 1)
            record = self.train_step(data_iter)
            runtime.heartbeat(f"iteration {self.iteration}")
            step_s = time.perf_counter() - t_step
            if self.plan_check is not None:  # predicted vs measured, once
                self.plan_check.report(step_s, self.tokens_per_iter)
                self.plan_check = None
            if record.get("data_skipped"):  # --iterations-to-skip
                continue
            if self.guards.after_step(record):  # rolled back to the last checkpoint
                data_iter, window = self._loader(self.data[0], self.consumed), []
                t_last, it_last = time.perf_counter(), self.iteration
                continue
            window.append(record)
            if self.iteration % a.log_interval == 0 or self.iteration == a.train_iters:
                runtime.fault_point("log", self.iteration)
                now = time.perf_counter()
                its = self.iteration - it_last
                record = self._log_record(window, (now - t_last) / its, now - t_start)
                history.append(record)
                window, t_last, it_last = [], now, self.iteration
            if stop.should_stop(self.iteration, step_s):
                break
            if a.eval_iters and self.data[1] is not None and self.iteration % a.eval_interval == 0:
                self.evaluate()
            if self.task_eval and (self.iteration % a.eval_tasks_interval == 0
                                   or self.iteration == a.train_iters):
                self.task_eval.run(self.model, self.iteration)
            if a.save and a.save_interval and self.iteration % a.save_interval == 0 and \
                    self.guards.may_save():  # never from a diverged state or inside a bad streak
                t_save = time.perf_counter()
                self.save()
                saved_at, stop.last_save_s = self.iteration, time.perf_counter() - t_save
        if stop.reason is not None:
            self.guards.refuse_unsafe(f"stopped by {stop.reason}")  # exit 3, nothing saved
            if a.save and saved_at != self.iteration:
                path = self.save()
                where = f"checkpoint {path} saved; resume with --load {a.save}"
            elif a.save:
                where = f"checkpoint of iteration {self.iteration} already in {a.save}"
            else:
                where = "nothing saved (no --save)"
            self.log(f"stopped at iteration {self.iteration}/{a.train_iters} by {stop.reason}: "
                     f"{where}")
            self.sink.close()
            return history
        if a.eval_iters and self.data[1] is not None and self.iteration % a.eval_interval:
            self.evaluate()
        self.guards.refuse_unsafe(f"end of the run, --train-iters {a.train_iters}")
        if a.save and saved_at != self.iteration:  # a resumed run that had nothing to do
            self.save()
        self.log(f"finished: iteration {self.iteration}/{a.train_iters} reached"
                 + (f"; final checkpoint in {a.save}" if a.save else "; nothing saved (no --save)"))
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
            "loss_scale": loss_scale(self.engine.optimizer) if self.precision == "fp16" else None,
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
                 f"mem {record['memory_gb']:.2f} GB | ETA {fmt_time(eta)}")
        self.sink.write(record)
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        a, accum = self.args, self.engine.gradient_accumulation_steps()
        self.engine.eval()
        valid, gb = self.data[1], self.ds["train_batch_size"]
        losses, data_iter = [], None
        runtime.fault_point("eval", self.iteration)
        for _ in range(a.eval_iters):
            runtime.heartbeat(f"evaluation at iteration {self.iteration}")
            if self.consumed_valid + gb > len(valid):  # sized for the planned evaluations; a
                self.consumed_valid, data_iter = 0, None  # resumed/extended run starts over
            if data_iter is None:
                data_iter = self._loader(valid, self.consumed_valid)
            if self.ps.pp_size > 1:  # loss broadcast from the last stage
                losses.append(pipeline_run.eval_batch(self, data_iter))
            else:
                for _ in range(accum):
                    losses.append(self._forward(next(data_iter)).float().item())
            self.consumed_valid += gb
        self.engine.train()
        val = self._dp_mean(sum(losses) / len(losses))
        ppl = math.exp(min(val, 50.0))
        self.log(f"validation at iter {self.iteration} | loss {val:.4f} | perplexity {ppl:.2f}")
        self.sink.write({"iteration": self.iteration, "val_loss": val, "val_ppl": ppl})
        return val

    def save(self) -> Path:
        a = self.args
        self.guards.refuse_unsafe("at a save")  # a diverged state never replaces a checkpoint
        client = {"iteration": self.iteration, "consumed_samples": self.consumed,
                  "consumed_valid_samples": self.consumed_valid, "rng": ckpt.rng_state(self.ps),
                  **self.guards.client_state()}
        files = {"type": a.tokenizer_type, "eod_token": a.eod_token}
        for key in ("vocab_file", "merge_file", "tokenizer_model"):
            if getattr(a, key):
                files[key] = getattr(a, key)
        if a.dataset_type == "sft" and (template := finetune.recorded_template(a.data_path)):
            files["chat_template"] = template  # the SFT data's chat template goes with the model
        runtime.heartbeat(f"saving iteration {self.iteration}")
        if a.lora_rank:  # the adapters, then their training state (the frozen base: never), latest last
            lora_run.save_lora(self)
            path = ckpt.save_training_checkpoint(self.engine, a.save, self.iteration, client,
                                                 self.config, self.ps, needed_bytes=self.checkpoint_bytes,
                                                 trainable_only=True)
            self.log(f"saved LoRA adapters and their training state {path}")
        else:  # universal-checkpoint info: a LoRA run resumes at its own sizes only, so not there
            client["universal_checkpoint_info"] = universal.checkpoint_info(self.pipe)
            path = ckpt.save_training_checkpoint(self.engine, a.save, self.iteration, client,
                                                 self.config, self.ps, tokenizer_files=files,
                                                 needed_bytes=self.checkpoint_bytes,
                                                 extra_config={"vocab_adaptation": self.vocab_record}
                                                 if self.vocab_record else None)
            self.log(f"saved checkpoint {path}")
        runtime.heartbeat(f"saved iteration {self.iteration}")
        if a.keep_last_n and self.ps.rank == 0:
            removed = save_dir.prune(a.save, a.keep_last_n, latest=path.name)
            if removed:
                self.log(f"--keep-last-n {a.keep_last_n}: removed {', '.join(removed)}")
        return path
