"""The generation prompt and the SFT rendering agree at the reply boundary: a training
conversation's ids start with exactly the prompt's ids, and the reply ids carry no leading space."""
import json

import pytest

from megatron_ru.data.chat_templates import load_template
from megatron_ru.data.sft_examples import record_to_example
from megatron_ru.data.tokenizers import build_tokenizer
from tests.helpers import demo_bpe, llama_tokenizer_dir

HISTORY = [{"role": "system", "content": "Ты помощник."},
           {"role": "user", "content": "Сколько будет 2+2?"},
           {"role": "assistant", "content": "Четыре."},
           {"role": "user", "content": "Какая столица Франции?"}]
REPLY = "Столица Франции — Париж."
# a tokenizer_config.json template whose generation prompt ends with a space ("Assistant: ")
SPACE_TEMPLATE = ("{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
                  "{% if m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token }}"
                  "{% else %}{{ m['role'] + ': ' + m['content'] }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '\\nAssistant: ' }}{% endif %}")


def _cases(tmp_path):
    bpe = demo_bpe()
    (tmp_path / "llama").mkdir()
    llama_dir = llama_tokenizer_dir(tmp_path / "llama")
    llama = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(llama_dir / "tokenizer.json"))
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": SPACE_TEMPLATE, "eos_token": "<|endoftext|>"}), encoding="utf-8")
    return [("rugpt3", bpe, load_template("rugpt3", bpe)),
            ("llama3", llama, load_template("llama3", llama, str(llama_dir))),
            ("tokenizer_config.json", bpe, load_template(None, bpe, str(cfg_dir)))]


def test_training_ids_start_with_the_prompt_ids_and_the_reply_has_no_leading_space(tmp_path):
    for name, tok, template in _cases(tmp_path):
        prompt = template.prompt_ids(tok, HISTORY)
        ids, mask = record_to_example({"messages": HISTORY + [{"role": "assistant", "content": REPLY}]},
                                      template=template, tokenizer=tok)
        assert ids[:len(prompt)] == prompt, name  # the prefix property
        reply = ids[len(prompt):]
        assert mask[len(prompt):] == [1] * len(reply) and mask[len(prompt) - 1] == 0, name
        eot = template.eot_id(tok)
        text = tok.detokenize([i for i in reply if i != eot])
        assert text == REPLY, (name, text)  # what a model trained on this data learns to say
        # the earlier reply of the history: a target, also without a leading space
        first = template.prompt_ids(tok, HISTORY[:2])
        assert ids[:len(first)] == first, name
        assert tok.detokenize(ids[len(first):len(first) + 2])[:1] == "Ч", name


@pytest.mark.parametrize("template_name", ["rugpt3"])
def test_the_rugpt3_prompt_ends_with_the_space(template_name):
    bpe = demo_bpe()
    template = load_template(template_name, bpe)
    assert bpe.detokenize(template.prompt_ids(bpe, HISTORY)).endswith("\nbot: ")
