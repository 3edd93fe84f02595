"""Checkpoint + tokenizer for evaluation: any format `generate.py` reads, at any TP size."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.model_io import load_model, read_config
from ..data.tokenizers import build_tokenizer
from ..parallel.state import ParallelState, discover_launch
from .perplexity import EvalInputError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def tokenizer_for(load: str, meta: dict, *, tokenizer_type=None, vocab_file=None, merge_file=None,
                  tokenizer_model=None, tokenizer_path=None, eod_token=None):
    """The tokenizer given by flags, else the one saved with the checkpoint (as generate.py)."""
    from argparse import Namespace
    from ..inference.cli import InputError, tokenizer_kwargs

    if not (vocab_file or merge_file or tokenizer_model or tokenizer_path):
        saved = Path(meta.get("tokenizer_dir") or Path(load) / "tokenizer")
        if saved.is_dir():
            tokenizer_path = str(saved)
            recorded = meta.get("tokenizer") or {}
            tokenizer_type = tokenizer_type or recorded.get("type")
            eod_token = eod_token if eod_token is not None else recorded.get("eod_token")
        elif (Path(load) / "vocab.json").is_file() or (Path(load) / "tokenizer.json").is_file():
            tokenizer_path = str(load)  # a Hugging Face directory holds its tokenizer
    args = Namespace(tokenizer_type=tokenizer_type, vocab_file=vocab_file, merge_file=merge_file,
                     tokenizer_model=tokenizer_model, tokenizer_path=tokenizer_path,
                     eod_token=eod_token)
    try:
        return build_tokenizer(**tokenizer_kwargs(args))
    except InputError as exc:
        raise EvalInputError(str(exc)) from None


def parallel_state(tp: Optional[int], timeout_s: float = 600.0) -> ParallelState:
    """One process: no process group; under a launcher: TP = `tp` or the number of processes."""
    launch = discover_launch()
    tp = tp or launch.world_size
    if launch.world_size == 1 and tp == 1:
        return ParallelState.single("cuda" if torch.cuda.is_available() else "cpu")
    return ParallelState.from_environment(tensor_model_parallel_size=tp, timeout_s=timeout_s)


def open_model(load: str, ps: ParallelState, *, dtype: str = "float32", tag=None,
               sparse_mode=None, sparse_impl=None, untrained_seed: Optional[int] = None,
               **tokenizer_flags):
    """(model in eval mode, tokenizer) with the checks evaluation needs before any work.
    `untrained_seed`: the checkpoint's model at initialisation, weights drawn from that seed as
    pretrain_gpt.py draws them (the same at every TP size): the baseline training starts from."""
    if dtype not in DTYPES:
        raise EvalInputError(f"dtype {dtype!r} is unknown; choose one of {sorted(DTYPES)}")
    config, meta = read_config(Path(load))
    tokenizer = tokenizer_for(load, meta, **tokenizer_flags)
    if tokenizer.vocab_size > config.vocab_size:
        raise EvalInputError(f"the tokenizer has {tokenizer.vocab_size} ids but the model in {load} "
                             f"only {config.vocab_size}: the checkpoint and tokenizer disagree on "
                             "the vocabulary")
    config.validate_parallel(ps.tp_size)
    overrides = {k: v for k, v in (("sparse_mode", sparse_mode), ("sparse_impl", sparse_impl))
                 if v is not None}
    if untrained_seed is not None:
        from ..config import ModelConfig
        from ..model.gpt import GPTModel
        config = ModelConfig.from_dict({**config.to_dict(), **overrides})
        ps.seed(untrained_seed)
        model = GPTModel(config, ps, seed=untrained_seed, device=ps.device).to(DTYPES[dtype])
        return model.eval(), tokenizer
    model = load_model(load, ps, tag=tag, dtype=DTYPES[dtype], device=ps.device, **overrides)
    return model.eval(), tokenizer
