"""lm-evaluation-harness backend `megatron_ru`: importing this module registers it in lm-eval's
model registry (lm-eval 0.4.x has no plugin entry point for models).

    import megatron_ru.evaluation.harness            # then lm_eval.simple_evaluate(model="megatron_ru", ...)
    python tools/run_lm_eval.py --model megatron_ru --model_args load=DIR,dtype=float32 --tasks ru_choice
    python tools/run_lm_eval.py --load BASE --lora DIR --tasks ru_choice   # generate.py's model flags
    mpirun --np 2 python tools/run_lm_eval.py --model megatron_ru --model_args load=DIR ...   # TP=2

`loglikelihood` / `loglikelihood_rolling` score with one forward per unique context
(scoring.py); `generate_until` runs our Generator (greedy or sampled, stop strings). Tokenization,
left truncation, rolling windows and the empty-context prefix follow lm-eval's `hf` backend, so
the numbers are comparable item by item. Under mpirun the TP group's rank 0 runs lm-eval and
the other ranks serve its forward passes (tp_worker.py).
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import lm_eval.models  # noqa: F401 - the built-in backends (hf, ...) register first
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
except ImportError as exc:  # an optional extra
    from ..errors import UsageError
    raise UsageError(f"the lm-eval backend needs the lm-eval package ({exc}); "
                     "pip install 'megatron_ru[eval]'") from None

from .. import runtime
from ..inference.generator import Generator
from ..inference.sampling import SamplingParams
from ..inference.loading import option_names, options_from_mapping
from .loading import open_for_scoring, parallel_state
from .perplexity import EvalInputError
from .scoring import generate, score_continuations
from .tp_worker import TPWorker, no_grad_handlers

NAME = "megatron_ru"


def _int(value, name: str, default: int) -> int:
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return default
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise EvalInputError(f"--model_args {name}={value!r} must be an integer") from None
    if out < 1:
        raise EvalInputError(f"--model_args {name}={out} must be >= 1")
    return out


@register_model(NAME)
class MegatronRuLM(TemplateLM):
    """`--model_args load=DIR[,batch_size=N][,max_length=N][,max_gen_toks=N][,seed=N]` plus any
    model flag of generate.py by its name: `lora=DIR`, `quantize=int8|int4`, `group_size=N`,
    `quantize_head=true`, `dtype=...`, `tag=...`, `tp=N`, `tokenizer_path=DIR | vocab_file=..,
    merge_file=..`, `sparse_mode=...` (inference/loading.py parses them as the flags).
    In Python, `MegatronRuLM(model=gpt_model, tokenizer=tok)` wraps a live model (training)."""

    # Instances whose TP servers wait for a "close" (lm-eval drops its reference when it is
    # done; tools/run_lm_eval.py then calls close_all() so the servers exit cleanly).
    _open: list = []

    def __init__(self, batch_size=8, max_length=None, max_gen_toks=256, seed=1234, *, model=None,
                 tokenizer=None, device=None, max_batch_size=None, template_dir=None,
                 **model_args) -> None:  # noqa: ARG002
        super().__init__()
        unknown = set(model_args) - option_names()
        if unknown:
            raise EvalInputError(f"--model_args {', '.join(sorted(unknown))}: unknown for "
                                 f"{NAME}; see megatron_ru/evaluation/harness.py")
        if model is None:
            if not model_args.get("load"):
                raise EvalInputError(f"--model {NAME} needs --model_args load=DIR")
            options = options_from_mapping(model_args)
            ps = parallel_state(options.tp)
            if ps.world_size != ps.tp_size:
                raise EvalInputError(f"{ps.world_size} processes at TP={ps.tp_size}: launch "
                                     "exactly TP processes for lm-eval")
            opened = runtime.checked(ps, open_for_scoring, options, ps)
            model, tokenizer, template_dir = opened.model, opened.tokenizer, opened.template_dir
        elif tokenizer is None:
            raise EvalInputError("MegatronRuLM(model=...) needs tokenizer=...")
        self.model, self.tokenizer_ = model, tokenizer
        self.template_dir, self._template = template_dir, None  # the model's own chat template, read on use
        self.ps = model.ps
        limit = model.config.max_position_embeddings
        self._max_length = min(_int(max_length, "max_length", limit), limit)
        self._max_gen_toks = _int(max_gen_toks, "max_gen_toks", 256)
        self._batch_size = _int(batch_size, "batch_size", 8)
        self._device = model.embed.weight.device
        self.generator = Generator(model, eod=tokenizer.eod, max_length=self._max_length)
        self.rng = None
        if self.ps.tp_rank == 0:
            self.rng = torch.Generator(device=self._device).manual_seed(_int(seed, "seed", 1234))
        self.worker = TPWorker(self.ps, no_grad_handlers({"score": self._score,
                                                          "generate": self._generate}))
        if self.ps.tp_comm is not None:
            MegatronRuLM._open.append(self)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """lm-eval's constructor path; `--model_args batch_size=N` wins over `--batch_size`."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                       additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None):
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # ---- the work every TP rank runs ------------------------------------------------------
    def _score(self, items):
        return score_continuations(self.model, items, batch_size=self._batch_size)

    def _generate(self, job):
        sampling = SamplingParams(**job["sampling"])
        return generate(self.generator, self.tokenizer_.detokenize, job["prompts"],
                        max_new_tokens=job["max_new_tokens"], sampling=sampling,
                        stops=job["stops"], rng=self.rng)

    def serve(self) -> None:
        """TP ranks other than 0: serve rank 0's calls until it closes."""
        self.worker.serve()
        self.close()

    def close(self) -> None:
        self.worker.close()
        if self in MegatronRuLM._open:
            MegatronRuLM._open.remove(self)

    @classmethod
    def close_all(cls) -> None:
        for lm in list(cls._open):
            lm.close()

    # ---- what lm-eval asks ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        """Fingerprints lm-eval's request cache: the chat template is part of the prompt."""
        from ..data.chat_templates import has_template
        return f"{NAME}:{self.chat_template().name}" if has_template(self.template_dir) else NAME

    def chat_template(self):
        """The chat template saved with the model (tokenizer/chat_template.jinja or the
        tokenizer_config.json `chat_template`), as generate.py --chat and the server use it."""
        if self._template is None:
            from ..data.chat_templates import has_template, load_template
            if not has_template(self.template_dir):
                raise EvalInputError(f"--apply_chat_template: the model in {self.template_dir or 'memory'} "
                                     "has no chat template (fine-tune with one, or evaluate without it)")
            self._template = load_template(None, self.tokenizer_, self.template_dir)
        return self._template

    def apply_chat_template(self, chat_history: list, add_generation_prompt: bool = True) -> str:
        """lm-eval's --apply_chat_template: the conversation rendered by the model's own template."""
        return self.chat_template().render(chat_history, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None,
                   **kwargs) -> list[int]:  # noqa: ARG002
        ids = self.tokenizer_.tokenize(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens) -> str:
        return self.tokenizer_.detokenize(list(tokens))

    def _call(self, op: str, payload):
        out = self.worker.call(op, payload)
        runtime.heartbeat(f"lm-eval {op}")
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):  # noqa: ARG002
        items = []
        for _, ctx, cont in requests:
            if len(cont) > self._max_length:
                raise EvalInputError(f"a continuation of {len(cont)} tokens does not fit the "
                                     f"model's {self._max_length} positions")
            extra = len(ctx) + len(cont) - (self._max_length + 1)
            items.append((list(ctx[max(extra, 0):]), list(cont)))  # left truncation, as `hf`
        return self._call("score", items) if items else []

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:  # noqa: ARG002
        items, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self._max_length, context_len=1)
            for ctx, cont in map(lm_utils.make_disjoint_window, windows):
                items.append((list(ctx), list(cont)))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, self._call("score", items) if items else []):
            totals[n] += lp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:  # noqa: ARG002
        eos = self.tokenizer_.detokenize([self.eot_token_id])
        jobs: dict[str, list[int]] = {}  # same generation kwargs → one batch stream
        for n, req in enumerate(requests):
            jobs.setdefault(repr(sorted(req.args[1].items())), []).append(n)
        out: list[str] = [""] * len(requests)
        for indices in jobs.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            room = self._max_length - max_new
            if room < 1:
                raise EvalInputError(f"max_gen_toks={max_new} leaves no room for a prompt in "
                                     f"{self._max_length} positions")
            sampling = {"greedy": not kwargs.get("do_sample", False),
                        "temperature": float(kwargs.get("temperature", 1.0) or 0.0),
                        "top_k": int(kwargs.get("top_k", 0) or 0),
                        "top_p": float(kwargs.get("top_p", 1.0) or 1.0),
                        "repetition_penalty": float(kwargs.get("repetition_penalty", 1.0))}
            # longest prompts first (batches of similar length), as the `hf` backend orders them
            prompts = {n: self.tok_encode(requests[n].args[0], left_truncate_len=room)
                       or [self.eot_token_id] for n in indices}
            order = sorted(indices, key=lambda n: -len(prompts[n]))
            for b in range(0, len(order), self._batch_size):
                chunk = order[b:b + self._batch_size]
                texts = self._call("generate", {"prompts": [prompts[n] for n in chunk],
                                                "max_new_tokens": max_new, "sampling": sampling,
                                                "stops": [s for s in until if s != eos]})
                for n, text in zip(chunk, texts):
                    out[n] = text
        return out

    def get_model_info(self) -> dict:
        cfg = self.model.config
        return {"model_num_parameters": cfg.num_parameters(), "model_family": cfg.family,
                "tensor_model_parallel_size": self.ps.tp_size}
