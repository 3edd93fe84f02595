"""Training guards: non-finite step policy, loss-spike rollback, and checked resumes (data arguments).

Non-finite policy. A step whose loss or gradient norm is NaN/inf makes no update and no LR step.
DeepSpeed already skips such steps for fp16 (loss scaling), ZeRO-1/2 and bf16 (ds_config turns on
bf16.check_grad_overflow); on the plain fp32 path (ZeRO-0, a torch optimizer) `before_update`
drops the gradients and raises the optimizer's `overflow` flag, which DeepSpeed's engine reads
to count the skip and hold the LR schedule. A finite loss above --max-loss (default 4 ln V, four
times the loss of guessing uniformly) counts the same (its update is applied). After
`--max-skipped-steps` such consecutive steps, or when fp16 loss scaling reaches its minimum, the run stops with one line and exit status
errors.EXIT_DIVERGED (3), without saving (or rolls back, with --rollback-on-nonfinite).

Diverged state (`unsafe_state`): nothing is saved from it, by any save (periodic, end of run,
signal, time limit): the last step's loss is not finite; or a step of the current streak of bad
steps applied an update with a loss above --max-loss; or the last step was a loss spike that was
not rolled back. A periodic save waits for the next interval (it also waits inside any streak of
skipped steps); a run that ends or is stopped in that state exits 3 and its last good checkpoint
stays `latest`. A streak of skipped steps alone (fp16 / bf16 overflows: no update was made) is not
diverged: the weights are the last good step's.

Spike rollback. A finite loss more than Z standard deviations above the mean of the last W
iterations (--spike-window W --spike-threshold Z) reloads the last checkpoint of --save in
process, skips the samples consumed since it (the data position jumps to where the spike
happened), re-saves that checkpoint with the skipped window recorded, and continues; at most
--max-rollbacks times. Events go to stdout and the metrics file.

Checked resumes. Every checkpoint records the data arguments (prefixes and weights, split, sequence
length, global batch, seed); a resume with other values is refused naming the fields, unless
--override-data-args (then the sampler continues at the consumed-sample count in the new setting).
"""
from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import EXIT_DIVERGED, JobFailure, UsageError
from ..checkpoint import training as ckpt
from ..data.blended import parse_data_path, parse_split

DIVERGED_HINT = ("try a lower --lr, a longer warmup (--lr-warmup-iters), --clip-grad, bf16 instead of "
                 "fp16, or --rollback-on-nonfinite with --save-interval")


class TrainingDiverged(JobFailure):
    """Every rank stops together (their skip decisions agree): exit status 3, nothing saved."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_DIVERGED)


class DataArgsMismatch(UsageError):
    """A resume whose data settings differ from the checkpoint's (without --override-data-args)."""


def data_args(args, global_batch: int) -> dict:
    """What the data order is a function of, as recorded in checkpoints."""
    blend = [[round(w, 12), str(Path(p).resolve())] for w, p in parse_data_path(args.data_path)]
    return {"data_path": blend, "split": [round(x, 12) for x in parse_split(args.split)],
            "seq_length": args.seq_length, "global_batch_size": global_batch, "seed": args.seed,
            "data_order": getattr(args, "data_order", "ours")}


def data_args_diff(saved: dict, current: dict) -> list[str]:
    flags = {"data_path": "--data-path", "split": "--split", "seq_length": "--seq-length",
             "global_batch_size": "global batch", "seed": "--seed", "data_order": "--data-order"}
    return [f"{flags.get(k, k)}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
            for k in flags if k in saved and saved.get(k) != current.get(k)]


class SpikeDetector:
    """Loss > mean + Z * std of the last W accepted losses (needs W of them first)."""

    def __init__(self, window: int, threshold: float) -> None:
        self.window, self.threshold = window, threshold
        self.history: deque = deque(maxlen=max(1, window))

    def is_spike(self, loss: float) -> bool:
        if not self.window or len(self.history) < self.window or not math.isfinite(loss):
            return False
        n = len(self.history)
        mean = sum(self.history) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / n)
        return loss > mean + self.threshold * max(std, 1e-6 * abs(mean) + 1e-12)

    def observe(self, loss: float) -> None:
        if math.isfinite(loss):
            self.history.append(loss)

    def reset(self) -> None:
        self.history.clear()


class Guards:
    """The trainer's policies; holds a reference to the Trainer (its engine, data position, log)."""

    def __init__(self, trainer) -> None:
        self.t, a = trainer, trainer.args
        self.max_skipped = a.max_skipped_steps
        # a finite loss far above guessing uniformly (ln V) has diverged too (fp32 --lr 100: ~4e5)
        self.max_loss = a.max_loss if a.max_loss is not None else 4 * math.log(trainer.tokenizer.vocab_size)
        self.spikes = SpikeDetector(a.spike_window or 0, a.spike_threshold)
        self.consecutive = 0
        self.last_finite = None  # (iteration, loss)
        self.exploded = None  # (iteration, loss): an update above --max-loss in the current streak
        self.nonfinite = False  # the last step's loss was NaN / inf
        self.spike_kept = None  # (iteration, reason): the last step was a spike not rolled back
        self.rollbacks = 0
        self.skipped_windows: list = []  # [{"start", "end", "iteration", "reason"}] in consumed samples
        self.pending = {"overflow": set(a.debug_inject_overflow_iters),
                        "spike": set(a.debug_inject_spike_iters)}
        ds = trainer.ds
        self.plain = trainer.precision == "fp32" and ds.get("zero_optimization", {}).get("stage", 0) == 0
        self.data_args = data_args(a, ds["train_batch_size"])

    # ---- test-only fault injection (each fires once per process, so a rollback does not repeat it)
    def inject(self, kind: str, iteration: int) -> bool:
        if iteration in self.pending[kind]:
            self.pending[kind].discard(iteration)
            return True
        return False

    # ---- inside train_step ----------------------------------------------------------------------
    def before_update(self, losses: list, norm) -> None:
        """Plain fp32 path, before the boundary engine.step(): a non-finite loss or gradient norm
        (on any rank) drops the gradients and flags the optimizer, so the step is skipped."""
        if not self.plain:
            return
        bad = not all(math.isfinite(x) for x in losses) or (norm is not None and not math.isfinite(norm))
        ps = self.t.ps
        if ps.world_size > 1:
            flag = torch.tensor([float(bad)], device=ps.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag.item() > 0
        optimizer = self.t.engine.optimizer
        if bad:  # this one step() does nothing; the engine then zeroes the gradients
            optimizer.step = lambda closure=None: None
        optimizer.overflow = bad  # DeepSpeed's engine: skipped_steps += 1, no LR step

    def engine_step(self) -> None:
        """engine.step(), with fp16's minimum-loss-scale error turned into the divergence stop."""
        optimizer = self.t.engine.optimizer
        try:
            self.t.engine.step()
        except Exception as exc:  # noqa: BLE001 - DeepSpeed raises a bare Exception here
            if "loss scale already at minimum" not in str(exc):
                raise
            self.diverged("fp16 loss scaling reached its minimum (min_loss_scale) and the gradients "
                          "still overflow")
        finally:
            vars(optimizer).pop("step", None)  # undo before_update's one-step skip

    # ---- after each step (fit) ------------------------------------------------------------------
    def after_step(self, record: dict) -> bool:
        """Apply the policies to a finished step; True when the run was rolled back (the caller
        rebuilds its data iterator at trainer.consumed)."""
        t, a = self.t, self.t.args
        loss, norm = record["loss"], record["grad_norm"]
        finite = math.isfinite(loss) and (norm is None or math.isfinite(norm))
        self.nonfinite, self.spike_kept = not math.isfinite(loss), None
        exploded = finite and bool(self.max_loss) and loss > self.max_loss
        if finite and not record["skipped"] and self.spikes.is_spike(loss):
            hist = list(self.spikes.history)
            mean = sum(hist) / len(hist)
            reason = (f"loss spike {loss:.4f} > mean {mean:.4f} of the last {len(hist)} iterations "
                      f"+ {a.spike_threshold:g} std")
            if self.rollback(reason):
                return True
            why = 'no checkpoint in --save' if self.rollbacks < a.max_rollbacks else '--max-rollbacks reached'
            t.log(f"iteration {t.iteration}: {reason}; not rolled back ({why})")
            self.spike_kept = (t.iteration, f"{reason}, not rolled back ({why})")
        if record["skipped"] or not finite or exploded:
            self.consecutive += 1
            if exploded and not record["skipped"]:  # its update has been applied
                self.exploded = self.exploded or (t.iteration, loss)
            what = (f"loss {loss:.4g} above --max-loss {self.max_loss:.4g}" if exploded and not record["skipped"]
                    else "step skipped")
            t.log(f"iteration {t.iteration}: {what} (loss {loss:.4g}, grad norm "
                  f"{'n/a' if norm is None else f'{norm:.4g}'}); {self.consecutive} consecutive, "
                  f"--max-skipped-steps {self.max_skipped}")
            t.sink.write({"iteration": t.iteration, "event": "skipped_step" if not exploded else "exploded_loss",
                          "loss": _json_num(loss), "grad_norm": _json_num(norm), "consecutive": self.consecutive})
            if self.consecutive >= self.max_skipped:
                reason = (f"{self.consecutive} consecutive steps skipped for a non-finite loss or gradient norm"
                          " or with a loss above --max-loss " + f"{self.max_loss:.4g}")
                if a.rollback_on_nonfinite and self.rollback(reason):
                    return True
                self.diverged(reason + f" (--max-skipped-steps {self.max_skipped})")
            return False
        self.consecutive, self.exploded = 0, None
        self.spikes.observe(loss)
        self.last_finite = (t.iteration, loss)
        return False

    def unsafe_state(self):
        """Why the model as it stands must not be saved (see the module docstring), or None."""
        if self.nonfinite:
            return f"the loss of iteration {self.t.iteration} is not finite"
        if self.exploded:
            it, loss = self.exploded
            since = " and no good step since" if self.t.iteration > it else ""
            return (f"the update of iteration {it} (loss {loss:.4g} above --max-loss "
                    f"{self.max_loss:.4g}) was applied{since}")
        if self.spike_kept:
            return f"iteration {self.spike_kept[0]}: {self.spike_kept[1]}"
        return None

    def may_save(self) -> bool:
        """A periodic save happens only outside any streak of bad steps and any diverged state."""
        return not self.consecutive and self.unsafe_state() is None

    def refuse_unsafe(self, when: str) -> None:
        """At the end of a run or a stop (`when`): exit 3 instead of saving a diverged state."""
        reason = self.unsafe_state()
        if reason is not None:
            self.diverged(f"{reason} ({when})")

    def diverged(self, reason: str) -> None:
        t, a = self.t, self.t.args
        last = (f"last good loss {self.last_finite[1]:.4f} at iteration {self.last_finite[0]}"
                if self.last_finite else "no finite loss yet")
        kept = ""
        if a.save:
            from ..checkpoint.save_dir import latest_or_newest
            tag = latest_or_newest(a.save)
            kept = f" ({tag} stays latest in {a.save})" if tag else f" (no checkpoint in {a.save})"
        t.sink.write({"iteration": t.iteration, "event": "diverged", "reason": reason})
        t.sink.close()
        raise TrainingDiverged(f"training diverged at iteration {t.iteration}: {reason}; {last}; "
                               f"the diverged state is not saved{kept}; {DIVERGED_HINT}")

    def rollback(self, reason: str) -> bool:
        """Reload the last checkpoint of --save, skip the data since it; False when impossible."""
        t, a = self.t, self.t.args
        if self.rollbacks >= a.max_rollbacks or not a.save or not (Path(a.save) / "latest").is_file():
            return False
        spike_iteration, spike_consumed = t.iteration, t.consumed
        client = ckpt.load_training_checkpoint(t.engine, a.save, load_optimizer=True,
                                               strict=not a.lora_rank, trust=a.trust_checkpoint)
        t.iteration = int(client.get("iteration", 0))
        start = int(client.get("consumed_samples", 0))
        t.consumed_valid = int(client.get("consumed_valid_samples", 0))
        if "rng" in client:
            ckpt.set_rng_state(client["rng"], t.ps)
        self.rollbacks += 1
        window = {"start": start, "end": spike_consumed, "iteration": spike_iteration, "reason": reason}
        self.skipped_windows = list(client.get("skipped_data", [])) + [window]
        t.consumed = spike_consumed  # the window [start, end) of the order is skipped
        self.spikes.reset()
        self.consecutive, self.exploded, self.nonfinite, self.spike_kept = 0, None, False, None
        t.log(f"rollback {self.rollbacks}/{a.max_rollbacks} at iteration {spike_iteration}: {reason}; "
              f"reloaded iteration {t.iteration} from {a.save}, skipping samples [{start}, {spike_consumed})")
        t.sink.write({"iteration": t.iteration, "event": "rollback", "from_iteration": spike_iteration,
                      "skipped_samples": [start, spike_consumed], "reason": reason})
        t.ensure_train_samples()
        t.save()  # the reloaded checkpoint now records the window: a later resume skips it too
        return True

    # ---- checkpoints --------------------------------------------------------------------------
    def client_state(self) -> dict:
        return {"data_args": self.data_args, "skipped_data": self.skipped_windows}

    def restore(self, client: dict) -> None:
        """On resume: refuse other data settings (unless --override-data-args); keep the windows."""
        t = self.t
        self.skipped_windows = list(client.get("skipped_data", []))
        saved = client.get("data_args")
        if saved is None:
            t.log("the checkpoint records no data arguments (older format): not checked")
            return
        diff = data_args_diff(saved, self.data_args)
        if not diff:
            return
        if not t.args.override_data_args:
            raise DataArgsMismatch(f"--load {t.args.load} was trained with other data settings: "
                                   + "; ".join(diff) + "; pass --override-data-args to continue anyway "
                                   "(the order restarts at the consumed-sample count in the new setting)")
        t.log("--override-data-args: continuing with other data settings (" + "; ".join(diff) +
              f"); the new order is entered at sample {t.consumed}")


def _json_num(x):
    return None if x is None or not math.isfinite(x) else x
