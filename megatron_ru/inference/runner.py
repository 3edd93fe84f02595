"""generate.py's work: the model (loading.open_model), prompt batches, streamed and file output.

Under `mpirun --np N` with N = TP size, rank 0 of the TP group draws every token and broadcasts
it (Generator). With N > TP size the data-parallel replicas all decode the same prompts with the
same seed (simple and deterministic; nothing is gained); only global rank 0 prints and writes.
In interactive mode global rank 0 reads stdin and broadcasts each line to every rank.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import runtime
from ..errors import UsageError
from ..files import atomic_write_text
from ..parallel.state import LaunchInfo, ParallelState, discover_launch
from .cli import Settings, parse, record
from .generator import Generator
from .loading import open_draft, open_model
from .text import StopStrings, TextStream

INTERACTIVE_PROMPT = "Model prompt (\"stop\" or end of input to quit) >>> "


def main(argv=None) -> int:
    """generate.py's main; run it under `runtime.run`, which reports errors and contains failures."""
    settings = parse(argv)
    runtime.start_watchdog(settings.args.hang_timeout_minutes)
    return Session.open(settings, discover_launch()).run()


class Session:
    """A loaded model with its tokenizer and settings; `run()` serves the chosen input mode."""

    def __init__(self, settings: Settings, ps: ParallelState, generator: Generator, tokenizer) -> None:
        self.settings, self.args, self.ps = settings, settings.args, ps
        self.gen, self.tok = generator, tokenizer
        self.stops = StopStrings(settings.stops, tokenizer.detokenize)
        self.writer = ps.rank == 0
        self.show = self.writer and not self.args.quiet
        self.rng = None  # only TP rank 0 draws
        if ps.tp_rank == 0:
            self.rng = torch.Generator(device=generator.device).manual_seed(self.args.seed)
        self.new_tokens = 0

    @classmethod
    def open(cls, settings: Settings, launch: LaunchInfo) -> "Session":
        args = settings.args
        opened = open_model(settings.model, max_length=args.seq_length, seed=args.seed,
                            timeout_s=60.0 * args.distributed_timeout_minutes)
        model, tokenizer, ps = opened.model, opened.tokenizer, opened.ps
        if ps.dp_size > 1 and ps.rank == 0:
            print(f"note: {ps.world_size} processes at TP={ps.tp_size}: the {ps.dp_size} replicas "
                  "decode the same prompts; only rank 0 writes", file=sys.stderr)
        template, ends = None, ()
        if args.chat:  # the end-of-turn token ends a reply, as the end of text does
            from ..data.chat_templates import load_template
            template = load_template(args.chat_template, tokenizer, opened.template_dir)
            ends = (template.eot_id(tokenizer),)
        generator = Generator(model, eod=tokenizer.eod,
                              max_length=args.seq_length or model.config.max_position_embeddings,
                              compile=args.compile, end_ids=ends)
        if args.draft_load:  # speculative decoding (inference/speculative.py)
            from .speculative import SpeculativeGenerator
            draft = open_draft(args.draft_load, opened, quantize=args.draft_quantize)
            generator = SpeculativeGenerator(generator, draft, args.draft_tokens)
        session = cls(settings, ps, generator, tokenizer)
        session.template = template
        return session

    # ---- modes ----------------------------------------------------------------------------
    def run(self) -> int:
        if self.args.chat:
            from . import chat_session
            return chat_session.run(self)
        if self.settings.prompts is None:
            return self.interactive()
        source = "--prompt" if self.args.prompt is not None else (
            f"--sample-input-file {self.args.sample_input_file}" if self.args.sample_input_file
            else "unconditional")
        prompts = [(text, self.encode(text, f"prompt {i + 1} ({source})"))
                   for i, text in enumerate(self.settings.prompts)]  # all checked before work
        rows = [row for row in prompts for _ in range(self.settings.num_samples)]
        t0, lines = time.perf_counter(), []
        for start in range(0, len(rows), self.args.batch_size):
            lines += self.generate_rows(rows[start:start + self.args.batch_size], show_prompt=True)
        elapsed = time.perf_counter() - t0
        if self.writer and self.args.sample_output_file:
            atomic_write_text(Path(self.args.sample_output_file), "".join(line + "\n" for line in lines))
        if self.writer:
            print(f"[{len(rows)} samples, {self.new_tokens} new tokens in {elapsed:.2f} s: "
                  f"{self.new_tokens / max(elapsed, 1e-9):.1f} tokens/s, {self.ps}"
                  f"{self.gen.summary() if hasattr(self.gen, 'summary') else ''}]",
                  file=sys.stderr, flush=True)
        return 0

    def interactive(self) -> int:
        while True:
            line = self.read_line()
            if line is None or line.strip() == "stop":
                return 0
            if not line.strip():
                continue
            try:  # a bad line is reported and the session goes on
                ids = self.encode(line, "the prompt")
                rows = [(line, ids)] * self.settings.num_samples
                for start in range(0, len(rows), self.args.batch_size):
                    self.generate_rows(rows[start:start + self.args.batch_size], show_prompt=False)
            except UsageError as exc:  # a user mistake in this line (every error class of ours)
                if self.writer:
                    print(f"error: {exc}", file=sys.stderr, flush=True)

    def read_line(self, prompt: str = INTERACTIVE_PROMPT):
        """Rank 0 reads a line from stdin (None at the end); every rank gets it."""
        line = None
        if self.ps.rank == 0:
            print(prompt, end="", file=sys.stderr, flush=True)
            raw = sys.stdin.readline()
            line = raw.rstrip("\r\n") if raw else None
        if self.ps.world_size > 1:
            box = [line]
            dist.broadcast_object_list(box, src=0)
            line = box[0]
        return line

    # ---- work -----------------------------------------------------------------------------
    def encode(self, text: str, name: str) -> list[int]:
        """Token ids of a prompt; an empty prompt is a lone end-of-text (unconditional)."""
        ids = self.tok.tokenize(text) if text else [self.tok.eod]
        self.gen.check_prompt(ids, name)
        return ids

    def generate_rows(self, rows: list[tuple[str, list[int]]], show_prompt: bool) -> list[str]:
        """Decode one batch; print each sample (streamed when the batch has one row); return
        the JSON lines."""
        stream = TextStream(self.tok.detokenize, self.stops) if self.show and len(rows) == 1 else None
        on_token = None
        if stream is not None:
            if show_prompt:
                print(rows[0][0], end="", flush=True)
            on_token = lambda _row, token: print(stream.push(token), end="", flush=True)  # noqa: E731
        args = self.args
        completions = self.gen.generate(
            [ids for _, ids in rows], max_new_tokens=args.max_new_tokens,
            sampling=self.settings.sampling, min_new_tokens=args.min_new_tokens,
            generator=self.rng, stop=self.stops if self.stops else None, on_token=on_token)
        lines = []
        for (prompt, _), c in zip(rows, completions):
            text = self.tok.detokenize(c.tokens)
            if c.finish_reason == "stop":
                text = self.stops.truncate(text)
            self.new_tokens += len(c.tokens)
            if stream is not None:
                print(stream.finish(text), flush=True)
            elif self.show:
                print((prompt if show_prompt else "") + text, flush=True)
            if self.show:
                print(flush=True)
            lines.append(record(prompt, text, c.tokens, c.finish_reason))
        return lines
