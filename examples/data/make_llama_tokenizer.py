"""Writes tokenizer_llama/: a small byte-level BPE `tokenizer.json` with the Llama-3 chat special
tokens, and a `tokenizer_config.json` whose `chat_template` is the Llama-3 one, trained on the
bundled Russian texts. It stands in for the T-lite tokenizer in the tiny CPU fine-tuning demo.
    python examples/data/make_llama_tokenizer.py
"""
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from megatron_ru.data.chat_templates import LLAMA3  # noqa: E402

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def texts(here):
    with open(os.path.join(here, "ru_demo.txt"), encoding="utf-8") as f:
        yield from f.read().split("\n")
    with open(os.path.join(here, "ru_sft.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            for m in row.get("messages", []):
                yield m["content"]
            yield from (row.get(k, "") for k in ("prompt", "response"))
    yield "system user assistant"


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "tokenizer_llama")
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(here), trainer)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                   "eos_token": "<|eot_id|>", "model_max_length": 8192, "chat_template": LLAMA3},
                  f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {out}: {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
