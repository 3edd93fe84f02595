"""tools/plan.py: bad input is one line and exit 2; the layout it picks for a tiny model on 2 CPU ranks runs within its memory prediction."""
import re
import subprocess
import sys

import pytest

from megatron_ru import ModelConfig
from megatron_ru.errors import UsageError
from megatron_ru.planning import cli
from megatron_ru.planning.accelerators import Accelerator
from megatron_ru.planning.search import plan
from tests.helpers import ROOT, clean_env, pretrain


@pytest.mark.parametrize("argv, words", [
    (["--preset", "tiny-gpt3", "--gpus", "2", "--gpu", "tpu-v9", "--global-batch-size", "8"], "--gpu 'tpu-v9' is unknown"),
    (["--preset", "rugpt3-13b", "--gpus", "1", "--gpu", "l40s", "--global-batch-size", "8"], "no layout of 1 x l40s fits"),
    (["--preset", "tiny-gpt3", "--gpus", "3", "--gpus-per-node", "3", "--global-batch-size", "4"], "no layout divides 3 GPUs"),
])
def test_bad_input_is_a_usage_error(argv, words):
    with pytest.raises(UsageError, match=re.escape(words)):
        cli.main(argv)


def test_bad_input_one_line_exit_2():
    proc = subprocess.run([sys.executable, "tools/plan.py", "--preset", "tiny-gpt3", "--gpus", "2",
                           "--gpu", "tpu-v9", "--global-batch-size", "8"], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "tpu-v9" in proc.stderr, proc.stderr


def test_table_and_command_line(capsys):
    assert cli.main(["--preset", "rugpt3-xl", "--gpus", "8", "--gpu", "a100-40gb", "--seq-length", "2048",
                     "--global-batch-size", "64", "--micro-batch-size", "1", "--gpu-mem-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "tok/s/GPU" in out and "mpirun -np 8 python pretrain_gpt.py --preset rugpt3-xl" in out
    assert "do not fit" in out  # TP1 ZeRO 0: 1.3B x 16 bytes = 21 GB + activations > 24 GB


@pytest.mark.slow
@pytest.mark.mpirun
def test_chosen_layout_runs_within_its_prediction(tmp_path):
    """2 CPU 'GPUs' of a few MB: the planner's fastest fitting layout (of what pretrain_gpt.py runs
    here) trains, and the memory it measures stays within the prediction."""
    cfg = ModelConfig.from_preset("tiny-gpt3", vocab_size=50257)  # the demo tokenizer's vocabulary
    cpu = Accelerator("cpu-test", tflops=0.05, mem_gb=0.0, hbm_gbps=10.0, intra_gbps=1.0, inter_gbps=1.0)
    kw = dict(gpus=2, gpus_per_node=2, seq_length=64, global_batch=8, precision="fp32",
              implemented={"tp", "zero", "recompute"}, device="cpu", reserve=0.0, micro_batches=[2, 4])
    everything, _ = plan(cfg, Accelerator(**{**vars(cpu), "mem_gb": 1.0}), **kw)
    largest = max(r.memory["total"] for r in everything)
    smallest = min(r.memory["total"] for r in everything)
    limit = (largest + smallest) / 2 / 1e9  # some layouts fit, some do not
    fits, rejected = plan(cfg, Accelerator(**{**vars(cpu), "mem_gb": limit}), **kw)
    assert fits and rejected
    best = fits[0].layout
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": %d}}' % best.zero)
    extra = ["--tensor-model-parallel-size", str(best.tp), "--micro-batch-size", str(best.micro_batch),
             "--global-batch-size", "8", "--train-iters", "1", "--deepspeed_config", str(ds)]
    if best.recompute == "full":
        extra.append("--checkpoint-activations")
    proc, records = pretrain(tmp_path, "run", *extra, np_=2)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("plan check"))
    measured = float(re.search(r"measured ([\d.]+) MB", line).group(1)) * 1e6
    assert measured <= fits[0].memory["total"], (line, fits[0].memory)
    assert measured <= limit * 1e9
    assert records and records[0]["iteration"] == 1


# ---- every command the planner prints is one pretrain_gpt.py accepts ---------------------------
COMMAND_CASES = [  # planner argv (tiny models, big made-up clusters so that every split shows up)
    ["--preset", "tiny-gpt3", "--gpus", "24", "--gpus-per-node", "8", "--seq-length", "256",
     "--global-batch-size", "96", "--gpu", "a100-80gb"],
    ["--preset", "tiny-llama", "--gpus", "16", "--gpus-per-node", "4", "--seq-length", "256",
     "--global-batch-size", "64", "--gpu", "h100"],
    ["--preset", "tiny-llama", "--gpus", "12", "--gpus-per-node", "4", "--seq-length", "128",
     "--global-batch-size", "48", "--gpu", "l40s", "--reset-attention-mask"],
    ["--preset", "tiny-gpt3", "--gpus", "8", "--gpus-per-node", "8", "--seq-length", "128",
     "--global-batch-size", "32", "--dataset-type", "sft", "--sft-packing", "packed"],
]


def _accepts(command: str, gpus: int, gpus_per_node: int, tmp_path, vocab: int = 1000) -> dict:
    """Run the toolkit's own pre-compute checks on a printed command (no processes, no model):
    the flag parser and validate(), the DeepSpeed config, the model config, the rank layout, the
    pipeline checks and hpZ's group checks for every rank, as pretrain_gpt.py does them."""
    import json
    import shlex

    from megatron_ru.parallel.context import check_sequence_length
    from megatron_ru.parallel.state import ParallelState
    from megatron_ru.training import arguments, ds_config, hpz, pipeline_run

    text, _, ds_text = command.partition("  # ds.json: ")
    argv = shlex.split(text.replace("\\\n", " "))
    assert argv[:5] == ["mpirun", "-np", str(gpus), "python", "pretrain_gpt.py"], argv
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(ds_text.split("\n")[0])
    argv = [str(ds_path) if a == "ds.json" else a for a in argv[5:]]
    args = arguments.parse_pretrain_args(argv + ["--data-path", "data/x"])  # + validate()
    tp, pp, cp = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                  args.context_parallel_size)
    log = lambda *_: None  # noqa: E731
    for rank in range(gpus):
        ps = ParallelState(rank=rank, world_size=gpus, local_rank=rank % gpus_per_node,
                           tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                           context_parallel_size=cp)
        ds, sparse, _ = ds_config.build(args, ps.dp_size, log)
        hpz.setup(ds, ps, str(ds_path), gpus_per_node, log)
        cfg = arguments.model_config(args, vocab, sparse, log)
        cfg.validate_parallel(tp, cp)
        check_sequence_length(args.seq_length, cp)
        if pp > 1:
            pipeline_run.check(args, ds, cfg, ps, log)
        if cfg.sequence_parallel and tp > 1:  # the forward's own check, per CP slice
            assert (args.seq_length // cp) % tp == 0, command
    return json.loads(ds_path.read_text())


def test_printed_commands_pass_the_toolkits_checks(tmp_path):
    from megatron_ru.planning.cli import build_parser, command_line
    from megatron_ru.planning.search import Workload

    seen = set()
    for argv in COMMAND_CASES:
        a = build_parser().parse_args(argv)
        cfg = ModelConfig.from_preset(a.preset)
        workload = Workload(a.dataset_type, a.sft_packing, a.reset_attention_mask, a.reset_position_ids)
        fits, _ = plan(cfg, cli.get_accelerator(a.gpu), gpus=a.gpus, gpus_per_node=a.gpus_per_node,
                       seq_length=a.seq_length, global_batch=a.global_batch_size, workload=workload)
        picks = fits[:3] + [next(r for r in fits if pred(r.layout)) for pred in (
            lambda lay: lay.pp > 1, lambda lay: lay.cp > 1, lambda lay: lay.hpz > 1,
            lambda lay: lay.sp) if any(pred(r.layout) for r in fits)]
        for r in picks:
            lay = r.layout
            ds = _accepts(command_line(r, f"--preset {a.preset}", a, a.seq_length, "bf16"),
                          a.gpus, a.gpus_per_node, tmp_path)
            assert ds["zero_optimization"]["stage"] == lay.zero
            seen.add(("pp" if lay.pp > 1 else "") + ("cp" if lay.cp > 1 else "")
                     + ("hpz" if lay.hpz > 1 else "") + ("sp" if lay.sp else ""))
        if a.reset_attention_mask:
            assert all(r.layout.cp == 1 and r.layout.pp == 1 for r in fits)
        if a.dataset_type == "sft":
            assert all(r.layout.cp == 1 and r.layout.pp == 1 for r in fits)  # packed: no PP
        assert not any(r.layout.cp > 1 and r.layout.pp > 1 for r in fits)
    # the checks above saw each split: PP, CP, hpZ (with and without CP), SP
    assert all(any(x in s for s in seen) for x in ("pp", "cp", "hpz", "sp", "cphpz")), seen


def test_tlite_on_96_a100_prints_a_command_the_toolkit_accepts(tmp_path, capsys):
    argv = ["--preset", "tlite-8b", "--gpus", "96", "--gpus-per-node", "8", "--gpu", "a100-80gb",
            "--seq-length", "8192", "--global-batch-size", "1024", "--bf16"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    command = out[out.index("mpirun"):out.index("\n\n", out.index("mpirun"))]
    assert "--context-parallel-size" not in command or "--pipeline-model-parallel-size" not in command
    _accepts(command, 96, 8, tmp_path, vocab=ModelConfig.from_preset("tlite-8b").vocab_size)
