"""The lm-eval backend through the real `lm_eval.simple_evaluate` on the bundled tasks: per-item
log-likelihoods equal lm-eval's own `hf` backend on the exported model (1e-4) with identical
accuracies; generate_until equals generate.py greedy; loglikelihood_rolling equals `hf`; TP=2
under real mpirun equals TP=1; an unknown task is one line, exit 2."""
import json
import subprocess
import sys

import pytest
import torch

from megatron_ru import runtime
from megatron_ru.evaluation.scoring import score_continuations
from megatron_ru import GPTModel, ModelConfig
from tests import evalkit
from tests.e2e.test_mpirun import clean_env, mpirun

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
TASKS = ["ru_choice", "ru_yesno", "ru_answer"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared 2-core machine
    base = tmp_path_factory.mktemp("harness")
    ours = evalkit.make_checkpoint(base / "ours", max_positions=128)
    hf = evalkit.export_hf(ours, base / "hf")
    import megatron_ru.evaluation.harness  # noqa: F401 - registers `megatron_ru`
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=str(evalkit.TASKS), include_defaults=False)
    runs = {}
    for name, args in (("ours", f"load={ours},batch_size=4"),
                       ("hf", f"pretrained={hf},dtype=float32,device=cpu")):
        runs[name] = lm_eval.simple_evaluate(model="megatron_ru" if name == "ours" else "hf",
                                             model_args=args, tasks=TASKS, task_manager=tm,
                                             batch_size=4, log_samples=True, bootstrap_iters=0)
    yield {"ours": ours, "hf": hf, "runs": runs, "base": base}
    torch.set_num_threads(threads)


def per_item(result, task):
    return sorted(result["samples"][task], key=lambda s: s["doc_id"])


def test_loglikelihoods_and_accuracies_equal_hf_backend(setup):
    ours, hf = setup["runs"]["ours"], setup["runs"]["hf"]
    for task in ("ru_choice", "ru_yesno"):
        a, b = per_item(ours, task), per_item(hf, task)
        assert len(a) == len(b) >= 30
        for x, y in zip(a, b):
            assert x["arguments"] == y["arguments"]
            for (lp_x, greedy_x), (lp_y, greedy_y) in zip((r[0] for r in x["resps"]),
                                                          (r[0] for r in y["resps"])):
                assert abs(float(lp_x) - float(lp_y)) <= 1e-4 * max(1.0, abs(float(lp_y))), task
                assert greedy_x == greedy_y
            assert x["acc"] == y["acc"]
        assert ours["results"][task]["acc,none"] == hf["results"][task]["acc,none"]


def test_generate_until_equals_generate_py_greedy(setup, tmp_path):
    from megatron_ru.inference import runner
    samples = per_item(setup["runs"]["ours"], "ru_answer")
    prompts = [s["arguments"][0][0] for s in samples]
    sep = "\n@@@\n"
    (tmp_path / "prompts.txt").write_text(sep.join(prompts), encoding="utf-8")
    out = tmp_path / "gen.jsonl"
    code = runtime.run(runner.main, "generate.py", [
        "--load", str(setup["ours"]), "--sample-input-file", str(tmp_path / "prompts.txt"),
        "--prompt-separator", sep, "--greedy", "--out-seq-length", "8", "--stop", "\\n",
        "--stop", ".", "--batch-size", "4", "--quiet", "--sample-output-file", str(out)])
    assert code == 0
    texts = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    ours = [s["resps"][0][0] for s in samples]
    assert ours == texts
    assert sum(len(t) for t in texts) > 0  # the model does write something
    # and lm-eval's hf backend generates the same text on the exported weights
    assert ours == [s["resps"][0][0] for s in per_item(setup["runs"]["hf"], "ru_answer")]


def test_loglikelihood_rolling_equals_hf_backend(setup):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    texts = [evalkit.TEXT * 3, "Короткий текст.", evalkit.TEXT]  # the first spans several windows
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
            for i, t in enumerate(texts)]
    ours = get_model("megatron_ru")(load=str(setup["ours"]), batch_size=2)
    hf = get_model("hf")(pretrained=str(setup["hf"]), dtype="float32", device="cpu", batch_size=2)
    a, b = ours.loglikelihood_rolling(reqs), hf.loglikelihood_rolling(reqs)
    assert len(evalkit.tokenizer().tokenize(texts[0])) > 2 * ours.max_length
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(y)


def test_shared_context_scoring_equals_full_forwards_at_the_position_limit():
    """Mixed context and continuation lengths, rows that end exactly at the last position."""
    cfg = ModelConfig.from_preset("tiny-llama", vocab_size=300, max_position_embeddings=32,
                                  init_method_std=0.2)
    model = GPTModel(cfg, seed=1).eval()
    g = torch.Generator().manual_seed(0)
    r = lambda n: torch.randint(0, 300, (n,), generator=g).tolist()  # noqa: E731
    c1, c2, c3 = r(10), r(3), r(28)
    items = [(c1, r(2)), (c1, r(1)), (c2, r(8)), (c1, r(5)), (c3, r(5)), (c3, r(1)),
             (c2, r(30)), (r(31), r(2))]
    got = score_continuations(model, items, batch_size=2)
    with torch.no_grad():
        for (ctx, cont), (lp, greedy) in zip(items, got):
            logp = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]]))[0], -1)[len(ctx) - 1:]
            t = torch.tensor(cont)
            assert abs(logp.gather(-1, t[:, None]).sum().item() - lp) < 1e-5 * abs(lp)
            assert greedy == bool((logp.argmax(-1) == t).all())


def test_mpirun_tp2_equals_tp1(setup, tmp_path):
    out = tmp_path / "tp2"
    proc = subprocess.run(
        [mpirun(), "--np", "2", sys.executable, "tools/run_lm_eval.py", "--model", "megatron_ru",
         "--model_args", f"load={setup['ours']},batch_size=4", "--tasks", ",".join(TASKS),
         "--output_path", str(out), "--log_samples"],
        cwd=evalkit.ROOT, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = setup["runs"]["ours"]
    for task in TASKS:
        files = list(out.rglob(f"samples_{task}_*.jsonl"))
        assert len(files) == 1, files
        rows = sorted((json.loads(line) for line in files[0].read_text().splitlines()),
                      key=lambda s: s["doc_id"])
        ref = per_item(ours, task)
        assert len(rows) == len(ref)
        for x, y in zip(rows, ref):
            if task == "ru_answer":
                assert x["resps"] == y["resps"]
            else:
                for rx, ry in zip(x["resps"], y["resps"]):
                    assert abs(float(rx[0][0]) - float(ry[0][0])) <= 1e-5 * max(1, abs(float(ry[0][0])))


def test_unknown_task_is_one_line_exit_2(setup, capsys):
    from megatron_ru.evaluation import lm_eval_cli
    code = runtime.run(lm_eval_cli.main, "tools/run_lm_eval.py", [
        "--model", "megatron_ru", "--model_args", f"load={setup['ours']}", "--tasks", "ru_choise"])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "ru_choise" in err[0] and "ru_choice, ru_yesno" in err[0], err
