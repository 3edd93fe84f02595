"""One open_model for every entry point: evaluate.py on a LoRA directory = on its merged model; an
int8 checkpoint evaluates close to fp32; the lm-eval backend and serve.py take generate.py's model
flags (--load, --lora, --quantize); a bad combination is one line, exit 2, on every CLI."""
import json
import math

import pytest
import torch

from megatron_ru import runtime
from megatron_ru.checkpoint.convert import convert
from megatron_ru.checkpoint.load import load_model
from megatron_ru.evaluation import cli as evaluate_cli
from megatron_ru.inference.quantize import QuantSpec
from megatron_ru.inference.quantize_io import convert_quantized
from megatron_ru.checkpoint.lora_files import save_adapters
from megatron_ru.model.lora import adapter_parameters, apply_lora
from tests import evalkit

TARGETS = "qkv,proj,fc1,fc2"  # the tiny gpt3 ties its head to the embedding: no lm_head adapter


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base with its tokenizer, LoRA adapters with non-zero B, their merged model, and the
    base as an int8 quantized checkpoint."""
    root = tmp_path_factory.mktemp("open_model")
    base = evalkit.make_checkpoint(root / "base", max_positions=64)
    model = load_model(base).eval()
    apply_lora(model, rank=4, alpha=8.0, targets=TARGETS, seed=5)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    save_adapters(model, root / "lora", base=str(base))
    convert(base, root / "merged", "megatron_ru", adapters=str(root / "lora"), quiet=True)
    convert_quantized(base, root / "q8", QuantSpec("int8"), quiet=True)
    text = root / "held_out.txt"
    text.write_text(evalkit.TEXT, encoding="utf-8")
    return {"base": base, "lora": root / "lora", "merged": root / "merged", "q8": root / "q8",
            "text": text, "root": root}


def evaluate(models, name, *flags):
    out = models["root"] / f"{name}.json"
    argv = [*flags, "--input", str(models["text"]), "--seq-length", "32", "--stride", "16",
            "--batch-size", "3", "--output", str(out)]
    assert runtime.run(evaluate_cli.main, "tools/evaluate.py", argv) == 0
    return json.loads(out.read_text())


def test_lora_directory_evaluates_as_its_merged_model(models):
    merged = evaluate(models, "merged", "--load", str(models["merged"]))
    attached = evaluate(models, "attached", "--load", str(models["base"]), "--lora", str(models["lora"]))
    as_load = evaluate(models, "as_load", "--load", str(models["lora"]))  # the base it records
    base = evaluate(models, "base", "--load", str(models["base"]))
    for run in (attached, as_load):
        assert run["overall"]["tokens"] == merged["overall"]["tokens"]
        for key in ("loss", "bits_per_byte"):
            assert math.isclose(run["overall"][key], merged["overall"][key], rel_tol=1e-5), key
        assert run["lora"] == str(models["lora"])  # --load LORA: recorded as what was applied
    assert abs(base["overall"]["loss"] - merged["overall"]["loss"]) > 1e-3  # the adapters matter


def test_int8_checkpoint_evaluates_close_to_fp32(models):
    fp = evaluate(models, "fp32", "--load", str(models["base"]))
    stored = evaluate(models, "q8", "--load", str(models["q8"]))
    at_load = evaluate(models, "q8_at_load", "--load", str(models["base"]), "--quantize", "int8")
    assert "quantization" not in stored  # the checkpoint's own, not a flag
    assert at_load["quantization"] == {"method": "int8", "group_size": None, "head": False}
    assert stored["overall"] == {**at_load["overall"]}  # one quantization, stored or at load
    rel = abs(stored["overall"]["bits_per_byte"] / fp["overall"]["bits_per_byte"] - 1)
    assert 0 < rel < 0.01, rel
    # rows independent of their batch: another --batch-size gives the same numbers
    again = evaluate(models, "q8_b1", "--load", str(models["q8"]), "--batch-size", "1")
    assert again["overall"] == stored["overall"]


@pytest.mark.parametrize("flags,message", [
    (["--lora", "LORA", "--quantize", "int8"], "--lora with --quantize: merge the adapters first"),
    (["--fp16", "--bf16"], "--fp16 and --bf16 exclude each other"),
    (["--dtype", "float32", "--bf16"], "--bf16 and --dtype float32 disagree"),
    (["--group-size", "16"], "--group-size / --quantize-head need --quantize"),
])
def test_model_flag_mistakes_are_one_line_on_every_cli(models, capsys, flags, message):
    from megatron_ru.inference import runner
    from megatron_ru.serving import cli as server
    flags = [str(models["lora"]) if f == "LORA" else f for f in flags]
    base = ["--load", str(models["base"]), *flags]
    for prog, main, extra in (("generate.py", runner.main, ["--prompt", "x"]),
                              ("tools/evaluate.py", evaluate_cli.main, ["--input", str(models["text"])]),
                              ("tools/serve.py", server.main, [])):
        assert runtime.run(main, prog, base + extra) == 2, prog
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (prog, err)


def test_serve_refuses_generate_flags_and_unknown_ones(models, capsys):
    from megatron_ru.serving import cli as server
    args = server.parse(["--load", str(models["base"]), "--lora", str(models["lora"]), "--port", "0"])
    assert args.model.lora == str(models["lora"]) and args.model.quant is None
    for word, message in (("--top-p=0.5", "--top-p is a generate.py flag"),
                          ("--draft-load", "--draft-load is a generate.py flag"),
                          ("--no-such-flag", "unrecognized arguments: --no-such-flag")):
        code = runtime.run(server.main, "tools/serve.py", ["--load", str(models["base"]), word])
        assert code == 2 and message in capsys.readouterr().err, word


def test_lm_eval_backend_takes_the_same_flags(models, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from megatron_ru.evaluation import lm_eval_cli
    from megatron_ru.evaluation.harness import MegatronRuLM
    from lm_eval.tasks import TaskManager

    assert lm_eval_cli.model_flags_to_args(
        ["--load", "B", "--lora", "L", "--quantize-head", "--tasks", "t", "--model_args", "batch_size=2"]) == \
        ["--tasks", "t", "--model", "megatron_ru", "--model_args", "load=B,lora=L,quantize_head=true,batch_size=2"]
    out = tmp_path / "out"
    code = runtime.run(lm_eval_cli.main, "tools/run_lm_eval.py", [
        "--load", str(models["base"]), "--lora", str(models["lora"]), "--tasks", "ru_choice",
        "--limit", "6", "--batch_size", "4", "--output_path", str(out), "--log_samples"])
    assert code == 0
    rows = [json.loads(line) for f in out.rglob("samples_ru_choice_*.jsonl")
            for line in f.read_text().splitlines()]
    merged = lm_eval.simple_evaluate(model="megatron_ru", model_args=f"load={models['merged']}",
                                     tasks=["ru_choice"], limit=6, batch_size=4, log_samples=True,
                                     task_manager=TaskManager(include_path=str(evalkit.TASKS),
                                                              include_defaults=False),
                                     bootstrap_iters=0)["samples"]["ru_choice"]
    assert len(rows) == len(merged) == 6
    for x, y in zip(sorted(rows, key=lambda r: r["doc_id"]), sorted(merged, key=lambda r: r["doc_id"])):
        for rx, ry in zip(x["resps"], y["resps"]):
            assert abs(float(rx[0][0]) - float(ry[0][0])) <= 1e-5 * max(1, abs(float(ry[0][0])))
    # quantize=int8 through --model_args: the scores of the int8 checkpoint
    lm_flag = MegatronRuLM.create_from_arg_string(f"load={models['base']},quantize=int8,batch_size=4")
    lm_ckpt = MegatronRuLM.create_from_arg_string(f"load={models['q8']},batch_size=4")
    ids = lm_flag.tok_encode("Москва — столица России.")
    items = [((lm_flag.eot_token_id,), tuple(ids))]
    assert lm_flag._loglikelihood_tokens([(None, *i) for i in items]) == \
        lm_ckpt._loglikelihood_tokens([(None, *i) for i in items])
    with pytest.raises(Exception, match="invalid choice: 'int2'"):
        MegatronRuLM.create_from_arg_string(f"load={models['base']},quantize=int2")
