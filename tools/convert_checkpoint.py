r"""Converts a checkpoint between formats (source detected) and tensor-parallel sizes.

    python tools/convert_checkpoint.py --load SRC --save DST --to {hf,megatron_ru,megatron_core} \
        [--target-tensor-parallel-size M] [--target-pipeline-parallel-size P] [--dtype fp16|bf16|fp32]
        [--quantize int8|int4 [--group-size G] [--quantize-head]]   # megatron_ru, weight-only

SRC may be one of our checkpoints (any TP, ZeRO stages included), a Hugging Face directory
(GPT2LMHeadModel / LlamaForCausalLM, safetensors), a ru-gpts DeepSpeed checkpoint, or a Megatron-LM
checkpoint: legacy, Megatron-Core `--ckpt-format torch` (any TP x PP) or `torch_dist`.
--to megatron_core writes Megatron-Core `--ckpt-format torch` (release/mp_rank_XX); load it in
Megatron-LM with --load DST --ckpt-format torch --use-checkpoint-args --finetune
--transformer-impl local (or --megatron-spec te and --transformer-impl transformer_engine)
--tensor-model-parallel-size M. ru-gpts and Megatron pad the vocabulary: the real size is read from vocab.json /
config.json next to the weights or a matching preset; --vocab-size overrides. Output is written to
a temporary directory and renamed to DST when complete. Exit status 2 on bad input.
`--to universal` writes DeepSpeed's universal form of a training checkpoint of ours (resume at
another data-parallel size; pretrain_gpt.py also does this by itself on resume).
"""
import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ru.checkpoint.convert import convert  # noqa: E402
from megatron_ru.checkpoint.model_io import CheckpointError  # noqa: E402
from megatron_ru.checkpoint.safe_pickle import add_trust_argument  # noqa: E402
from megatron_ru.data.progress import progress_wanted  # noqa: E402
from megatron_ru import runtime  # noqa: E402
from megatron_ru.inference.quantize import spec_from_args  # noqa: E402
from megatron_ru.inference.quantize_io import convert_quantized  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="source checkpoint directory (format detected)")
    p.add_argument("--save", required=True, help="destination directory (must not exist)")
    p.add_argument("--to", required=True, choices=["hf", "megatron_ru", "megatron_core", "universal", "peft"],
                   help="universal: DeepSpeed's universal checkpoint of a training checkpoint of "
                        "ours, to resume at another data-parallel size (done automatically on "
                        "resume when --load is writable); peft: a LoRA adapter directory (--load) "
                        "in PEFT's format for the HF export of its base; hf / megatron_ru from an "
                        "adapter directory: adapters merged")
    p.add_argument("--megatron-spec", choices=["local", "te"], default="local",
                   help="--to megatron_core: layer names of Megatron-Core's local spec or its "
                        "Transformer Engine spec (norms fused into linear_qkv / linear_fc1)")
    p.add_argument("--base", help="base checkpoint of a LoRA --load (default: the one it records)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1, metavar="P",
                   help="--to megatron_core: pipeline stages of the output (mp_rank_XX_YYY; num_layers / P "
                        "layers each)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=None,
                   help="TP size of a megatron_ru / megatron_core output (default 1)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="output precision (default: the source's)")
    p.add_argument("--tag", default=None, help="source tag / iteration directory (default: latest)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="real vocabulary size of a ru-gpts / Megatron source (drops padding rows)")
    p.add_argument("--num-attention-heads", type=int, default=None,
                   help="heads of a ru-gpts source when neither the weights nor a config say")
    p.add_argument("--sparse-config", default=None,
                   help="DeepSpeed JSON with the sparse_attention section of a sparse ru-gpts source")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="HF safetensors shard size")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="write a weight-only quantized megatron_ru checkpoint (TP=1, loads at any "
                        "TP without the fp weights; see megatron_ru/inference/quantize.py)")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (default 32)")
    p.add_argument("--quantize-head", action="store_true", help="also quantize the output head")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress", action="store_true",
                   help="bars for the universal conversion and the adapter merge even when stderr "
                        "is not a terminal (on a terminal they are shown anyway)")
    add_trust_argument(p)
    runtime.add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    hints = {"vocab_size": args.vocab_size, "num_attention_heads": args.num_attention_heads}
    runtime.start_watchdog(args.hang_timeout_minutes)
    if runtime.discover_rank() != 0:  # under mpirun: rank 0 converts, the others have nothing to do
        return 0
    if args.to == "universal":
        from megatron_ru.checkpoint.universal import convert_directory
        dst = convert_directory(args.load, args.save, tag=args.tag, overwrite=args.overwrite,
                                trust=args.trust_checkpoint,
                                progress=progress_wanted(args.progress, args.quiet))
        print(f"wrote {dst}", file=sys.stderr)
        return 0
    if args.sparse_config:
        try:
            with open(args.sparse_config, encoding="utf-8") as f:
                section = json.load(f).get("sparse_attention")
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"--sparse-config {args.sparse_config}: invalid JSON ({exc})") from None
        if not isinstance(section, dict):
            raise CheckpointError(f"--sparse-config {args.sparse_config} has no sparse_attention section")
        hints["sparse_attention"] = section
    from megatron_ru.checkpoint import lora_files as lora
    adapters = None
    if lora.is_adapter_dir(args.load):  # LoRA adapters: export as PEFT, or merge into the base
        meta, _ = lora.read_adapters(args.load)
        if args.to == "peft":
            from megatron_ru.checkpoint.peft import export_peft
            dst = export_peft(args.load, args.save, base_name=args.base, overwrite=args.overwrite)
            print(f"wrote {dst}", file=sys.stderr)
            return 0
        adapters, args.load = args.load, lora.base_of(meta, args.load, args.base)
    elif args.to == "peft":
        raise CheckpointError(f"--to peft needs a LoRA adapter directory as --load; {args.load} is not one")
    spec = spec_from_args(args)
    if spec is not None:
        if args.to != "megatron_ru" or args.target_tensor_parallel_size not in (None, 1):
            raise CheckpointError("--quantize writes --to megatron_ru at TP=1 (it loads at any TP)")
        if adapters is not None:
            raise CheckpointError("--quantize of LoRA adapters: merge them first (--to megatron_ru), "
                                  "then quantize the merged checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
        if spec is not None:
            dst = convert_quantized(args.load, args.save, spec, tag=args.tag, dtype=args.dtype,
                                    overwrite=args.overwrite, quiet=args.quiet, trust=args.trust_checkpoint,
                                    **{k: v for k, v in hints.items() if v is not None})
            print(f"wrote {dst}", file=sys.stderr)
            return 0
        dst = convert(args.load, args.save, args.to, target_tp=args.target_tensor_parallel_size,
                      target_pp=args.target_pipeline_parallel_size,
                      dtype=args.dtype, tag=args.tag, overwrite=args.overwrite, quiet=args.quiet,
                      max_shard_bytes=int(args.max_shard_size_gb * 2**30), megatron_spec=args.megatron_spec,
                      adapters=adapters, trust=args.trust_checkpoint,
                      progress=progress_wanted(args.progress, args.quiet),
                      **{k: v for k, v in hints.items() if v is not None})
    print(f"wrote {dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(runtime.run(main, "convert_checkpoint.py"))
