"""The lm-eval backend through the real `lm_eval.simple_evaluate` on the bundled tasks: per-item
log-likelihoods equal lm-eval's own `hf` backend on the exported model (1e-4) with identical
accuracies; generate_until equals generate.py greedy; loglikelihood_rolling equals `hf`; an unknown
task is one line, exit 2. TP=2 under real mpirun: tests/e2e/test_evaluate_mpirun.py."""
import json

import pytest
import torch

from megatron_ru import runtime
from megatron_ru.evaluation.scoring import score_continuations
from megatron_ru import GPTModel, ModelConfig
from tests import evalkit

pytestmark = pytest.mark.slow

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared 2-core machine
    base = tmp_path_factory.mktemp("harness")
    ours = evalkit.make_checkpoint(base / "ours", max_positions=128)
    hf = evalkit.export_hf(ours, base / "hf")
    runs = {"ours": evalkit.lm_eval_run("megatron_ru", f"load={ours},batch_size=4"),
            "hf": evalkit.lm_eval_run("hf", f"pretrained={hf},dtype=float32,device=cpu")}
    yield {"ours": ours, "hf": hf, "runs": runs, "base": base}
    torch.set_num_threads(threads)


def test_loglikelihoods_and_accuracies_equal_hf_backend(setup):
    ours, hf = setup["runs"]["ours"], setup["runs"]["hf"]
    for task in ("ru_choice", "ru_yesno"):
        a, b = evalkit.per_item(ours, task), evalkit.per_item(hf, task)
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
    samples = evalkit.per_item(setup["runs"]["ours"], "ru_answer")
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
    assert ours == [s["resps"][0][0] for s in evalkit.per_item(setup["runs"]["hf"], "ru_answer")]


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


def test_unknown_task_is_one_line_exit_2(setup, capsys):
    from megatron_ru.evaluation import lm_eval_cli
    code = runtime.run(lm_eval_cli.main, "tools/run_lm_eval.py", [
        "--model", "megatron_ru", "--model_args", f"load={setup['ours']}", "--tasks", "ru_choise"])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "ru_choise" in err[0] and "ru_choice, ru_yesno" in err[0], err


def test_chat_template_of_the_model_is_applied_like_hf(setup):
    """lm-eval's --apply_chat_template renders with the template saved with the model, as transformers'
    apply_chat_template does with the HF export; a model without one is refused with one line."""
    import shutil

    from transformers import AutoTokenizer

    from megatron_ru.data.chat_templates import load_template
    from megatron_ru.evaluation.harness import MegatronRuLM
    from megatron_ru.evaluation.perplexity import EvalInputError

    chat = setup["base"] / "ours_chat"
    shutil.copytree(setup["ours"], chat)
    (chat / "tokenizer" / "chat_template.jinja").write_text(load_template("rugpt3").source, encoding="utf-8")
    messages = [{"role": "system", "content": "Отвечай кратко."}, {"role": "user", "content": "Столица Франции?"},
                {"role": "assistant", "content": "Париж."}, {"role": "user", "content": "А Италии?"}]
    lm = MegatronRuLM(load=str(chat))
    ours = lm.apply_chat_template(messages)
    hf = AutoTokenizer.from_pretrained(evalkit.export_hf(chat, setup["base"] / "hf_chat"))
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "А Италии?" in ours and ours != hf.apply_chat_template(messages, tokenize=False)
    assert lm.tokenizer_name != MegatronRuLM(load=str(setup["ours"])).tokenizer_name
    with pytest.raises(EvalInputError, match="has no chat template"):
        MegatronRuLM(load=str(setup["ours"])).apply_chat_template(messages)
