"""From a chat JSONL to a fine-tuned model that answers in chat form: preprocess (SFT), a real
`mpirun --np 2` fine-tune (packed rows, two data-parallel ranks), generate.py --chat."""
import json
import random
import subprocess
import sys

import pytest
import torch

from megatron_ru.training.arguments import model_config, parse_pretrain_args
from megatron_ru.checkpoint.model_io import latest_tag, save_model
from megatron_ru.data.tokenizers import build_tokenizer
from megatron_ru.inference.runner import main as generate_main
from megatron_ru.model.gpt import GPTModel
from megatron_ru.checkpoint.lora_files import read_adapters
from tests.helpers import ROOT, clean_env, run_mpirun as run
from tools import preprocess_data

pytestmark = pytest.mark.slow

TOK = ROOT / "examples" / "data" / "tokenizer"
SOUNDS = [("кошка", "мяу"), ("собака", "гав"), ("корова", "му"), ("утка", "кря"), ("лягушка", "ква"),
          ("ворона", "кар"), ("свинья", "хрю"), ("овца", "бе")]
MODEL = ["--preset", "tiny-gpt3", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "64", "--vocab-file", str(TOK / "vocab.json"), "--merge-file", str(TOK / "merges.txt")]


@pytest.mark.mpirun
def test_finetune_learns_toy_chat_task(tmp_path):
    rng = random.Random(0)
    train = tmp_path / "train.jsonl"
    with open(train, "w", encoding="utf-8") as f:
        for _ in range(200):
            animal, sound = rng.choice(SOUNDS)
            f.write(json.dumps({"prompt": f"Как говорит {animal}?", "response": f"{sound}."},
                               ensure_ascii=False) + "\n")
    assert preprocess_data.main(["--input", str(train), "--output-prefix", str(tmp_path / "toy"),
                                 "--dataset-type", "sft", "--chat-template", "rugpt3",
                                 "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(TOK / "vocab.json"),
                                 "--merge-file", str(TOK / "merges.txt")]) == 0
    # an untrained base model, saved as a checkpoint of exactly the shape the flags describe
    args = parse_pretrain_args([*MODEL, "--data-path", str(tmp_path / "toy")])
    vocab = build_tokenizer("GPT2BPETokenizer", vocab_file=str(TOK / "vocab.json"),
                            merge_file=str(TOK / "merges.txt")).vocab_size
    save_model(tmp_path / "base", GPTModel(model_config(args, vocab, None), seed=7))
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8,
                                                  "gradient_accumulation_steps": 1,
                                                  "zero_optimization": {"stage": 1}}))
    proc = run(2, "pretrain_gpt.py", *MODEL, "--deepspeed_config", str(tmp_path / "ds.json"),
               "--data-path", str(tmp_path / "toy"), "--dataset-type", "sft", "--sft-packing", "packed",
               "--split", "100,0,0", "--train-iters", "60", "--lr", "3e-3", "--lr-warmup-iters", "3",
               "--eval-iters", "0", "--log-interval", "20", "--finetune", "--load", str(tmp_path / "base"),
               "--save", str(tmp_path / "ft"), "--metrics-file", str(tmp_path / "metrics.jsonl"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 3, losses
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Как говорит {a}?"}]},
                                            ensure_ascii=False) + "\n" for a, _ in SOUNDS), encoding="utf-8")
    assert generate_main(["--load", str(tmp_path / "ft"), "--chat", "--chat-template", "rugpt3",
                          "--vocab-file", str(TOK / "vocab.json"), "--merge-file", str(TOK / "merges.txt"),
                          "--sample-input-file", str(questions), "--sample-output-file", str(tmp_path / "out.jsonl"),
                          "--greedy", "--out-seq-length", "8", "--quiet"]) == 0
    replies = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["messages"][0]["content"] for r in replies] == [f"Как говорит {a}?" for a, _ in SOUNDS]
    correct = sum(r["messages"][-1]["content"] == f"{s}." for r, (_, s) in zip(replies, SOUNDS))
    assert all(r["finish_reason"] == "eod" for r in replies)  # stopped by the end-of-turn token
    print(f"toy task: {correct}/8 replies right", [r["text"] for r in replies])
    assert correct >= 5, [r["text"] for r in replies]  # chance: 1 of 8


@pytest.mark.parametrize("config,precision,family", [("ds_zero3", "--bf16", "tiny-llama"),
                                                     ("ds_zero1", "--fp16", "tiny-gpt3")])
def test_lora_trains_under_zero_and_half_precision(tmp_path, config, precision, family):
    """LoRA on the bundled chats: ZeRO-3 + bf16 (Llama) and ZeRO-1 + fp16 (GPT-3); the saved
    adapters are gathered from the partitions and moved, the base is untouched."""
    tok = ["--vocab-file", str(TOK / "vocab.json"), "--merge-file", str(TOK / "merges.txt")]
    assert preprocess_data.main(["--input", str(ROOT / "examples" / "data" / "ru_sft.jsonl"),
                                 "--output-prefix", str(tmp_path / "sft"), "--dataset-type", "sft",
                                 "--chat-template", "rugpt3", "--tokenizer-type", "GPT2BPETokenizer", *tok]) == 0
    model = ["--preset", family, "--seq-length", "64", *tok]
    args = parse_pretrain_args([*model, "--data-path", str(tmp_path / "sft")])
    base = GPTModel(model_config(args, 1815, None), seed=7)
    save_model(tmp_path / "base", base)
    proc = subprocess.run([sys.executable, "pretrain_gpt.py", *model, "--deepspeed_config",
                           str(ROOT / "configs" / f"{config}.json"), precision, "--data-path", str(tmp_path / "sft"),
                           "--dataset-type", "sft", "--split", "100,0,0", "--train-iters", "3", "--lr", "1e-2",
                           "--eval-iters", "0", "--log-interval", "1", "--finetune", "--load", str(tmp_path / "base"),
                           "--lora-rank", "4", "--lora-targets", "qkv,proj,fc1,fc2,lm_head",
                           "--save", str(tmp_path / "lora")],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "base frozen" in proc.stdout and "saved LoRA adapters" in proc.stdout
    meta, tensors = read_adapters(tmp_path / "lora")
    assert meta["base"] == str(tmp_path / "base") and meta["rank"] == 4
    assert all(float(t.abs().max()) > 0 for n, t in tensors.items() if n.endswith(".B")), "B never moved"
    state = list((tmp_path / "lora" / latest_tag(tmp_path / "lora")).glob("*model_states.pt"))
    assert state and sum(f.stat().st_size for f in state) < 200_000  # the adapters' state, no base


def test_lora_run_resumes_bit_exactly(tmp_path):
    """`--pretrained-checkpoint BASE --load RUN --save RUN`: the first launch starts from BASE,
    a later one resumes RUN (adapters, their optimizer state, schedule, data position); a run
    stopped at iteration 2 and relaunched ends where the straight run does (ZeRO-3, adapters on
    the output head too). Other LoRA settings or another base are refused."""
    tok = ["--vocab-file", str(TOK / "vocab.json"), "--merge-file", str(TOK / "merges.txt")]
    assert preprocess_data.main(["--input", str(ROOT / "examples" / "data" / "ru_sft.jsonl"),
                                 "--output-prefix", str(tmp_path / "sft"), "--dataset-type", "sft",
                                 "--chat-template", "rugpt3", "--tokenizer-type", "GPT2BPETokenizer", *tok]) == 0
    model = ["--preset", "tiny-gpt3", "--seq-length", "64", *tok]
    args = parse_pretrain_args([*model, "--data-path", str(tmp_path / "sft")])
    save_model(tmp_path / "base", GPTModel(model_config(args, 1815, None), seed=7))

    def launch(run, *extra, base=tmp_path / "base", iters=4):
        return subprocess.run([sys.executable, "pretrain_gpt.py", *model, "--data-path", str(tmp_path / "sft"),
                               "--dataset-type", "sft", "--split", "100,0,0", "--train-iters", str(iters),
                               "--lr", "1e-2", "--eval-iters", "0", "--log-interval", "1", "--save-interval", "2",
                               "--deepspeed_config", str(ROOT / "configs" / "ds_zero3.json"),
                               "--lora-rank", "4", "--lora-targets", "qkv,proj,fc1,fc2,lm_head",
                               "--pretrained-checkpoint", str(base), "--load", str(run),
                               "--save", str(run), "--metrics-file", f"{run}.jsonl", *extra],
                              cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)

    def losses(run):
        rows = [json.loads(line) for line in open(f"{run}.jsonl", encoding="utf-8")]
        return [(r["iteration"], r["loss"]) for r in rows if "loss" in r]

    straight = launch(tmp_path / "straight")
    assert straight.returncode == 0 and "starting from --pretrained-checkpoint" in straight.stdout, \
        straight.stderr[-3000:]
    first = launch(tmp_path / "split", "--exit-interval", "2")
    assert first.returncode == 0 and latest_tag(tmp_path / "split") == "iter_0000002", first.stderr[-3000:]
    second = launch(tmp_path / "split")
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]
    assert losses(tmp_path / "split") == losses(tmp_path / "straight") and len(losses(tmp_path / "split")) == 4
    (ma, a), (mb, b) = read_adapters(tmp_path / "straight"), read_adapters(tmp_path / "split")
    assert mb["iteration"] == 4 and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    other = launch(tmp_path / "split", "--lora-rank", "8")
    assert other.returncode == 2 and "--lora-rank 8, but the LoRA run" in other.stderr, other.stderr[-2000:]
    whole = launch(tmp_path / "base", "--exit-interval", "1")  # a whole model is no LoRA run
    assert whole.returncode == 2 and "holds a whole model's training checkpoint" in whole.stderr, \
        whole.stderr[-2000:]
    (tmp_path / "base").rename(tmp_path / "moved")  # the base moved: name its new place
    gone = launch(tmp_path / "split", iters=5)
    assert gone.returncode == 2 and "which does not exist: pass its new place" in gone.stderr, gone.stderr[-2000:]
    moved = launch(tmp_path / "split", base=tmp_path / "moved", iters=5)
    assert moved.returncode == 0 and "resumed from" in moved.stdout, moved.stderr[-2000:]
    assert [i for i, _ in losses(tmp_path / "split")] == [1, 2, 3, 4, 5]
