"""The server's chat format (serving/chat.py): the tokenizer's chat template when it has one, the
built-in rugpt3 dialogue style otherwise or when asked, the template's end-of-turn token as a stop
token, refused conversations as HTTP 400 and bad templates as usage errors."""
import json

import pytest

pytest.importorskip("jinja2")
pytest.importorskip("fastapi")

from megatron_ru.data.chat_templates import ChatError, load_template  # noqa: E402
from megatron_ru.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_ru.serving.chat_prompt import load_chat_format  # noqa: E402
from megatron_ru.serving.protocol import ApiError  # noqa: E402
from tests.helpers import TOKENIZER  # noqa: E402

TOK_DIR = str(TOKENIZER)


MESSAGES = [{"role": "system", "content": "Ты помощник."}, {"role": "user", "content": "Привет!"}]


def test_without_a_template_the_rugpt3_dialogue_style(bpe):
    fmt = load_chat_format(None, bpe, TOK_DIR)  # the demo tokenizer has no tokenizer_config.json
    assert "rugpt3" in fmt.name and "has no chat template" in fmt.name
    ref = load_template("rugpt3", bpe)
    assert fmt.prompt_ids(bpe, MESSAGES) == ref.prompt_ids(bpe, MESSAGES)
    assert bpe.detokenize(fmt.prompt_ids(bpe, MESSAGES)) == "system: Ты помощник.\nuser: Привет!\nbot: "
    assert fmt.stops == ("\nuser:",) and fmt.stop_ids == ()  # the reply ends at the end of text
    assert load_chat_format("rugpt3", bpe, None).name == "--chat-template rugpt3"


def test_tokenizer_template_and_its_end_of_turn_token(llama_tok_dir):
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(llama_tok_dir / "tokenizer.json"))
    eot = tok.tok.token_to_id("<|eot_id|>")
    assert tok.eod != eot  # <|end_of_text|>: the end-of-turn token must stop a reply on its own
    llama = load_chat_format("llama3", tok, None)
    assert llama.stop_ids == (eot,) and llama.stops == ()
    ids = llama.prompt_ids(tok, MESSAGES)
    assert ids.count(eot) == 2 and tok.detokenize(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    custom = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<|eot_id|>{% endfor %}" \
             "{% if add_generation_prompt %}[assistant]{% endif %}"
    # as in T-lite's tokenizer_config.json: the eos_token (what ends a turn) is <|eot_id|>
    (llama_tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": custom,
                                                                    "eos_token": "<|eot_id|>"}))
    try:
        own = load_chat_format(None, tok, str(llama_tok_dir))  # the tokenizer's own template
        assert own.name.endswith("tokenizer_config.json") and own.stop_ids == (eot,)
        assert tok.detokenize(own.prompt_ids(tok, MESSAGES)) == \
            "[system]Ты помощник.<|eot_id|>[user]Привет!<|eot_id|>[assistant]"
    finally:
        (llama_tok_dir / "tokenizer_config.json").unlink()


def test_refused_conversations_and_bad_templates(bpe, tmp_path):
    fmt = load_chat_format(None, bpe, None)
    with pytest.raises(ApiError) as err:  # a system message after the first: the template's rule
        fmt.prompt_ids(bpe, [MESSAGES[1], MESSAGES[0]])
    assert err.value.status == 400 and err.value.param == "messages"
    raising = tmp_path / "raising.jinja"
    raising.write_text("{{ raise_exception('only one message, please') if messages|length > 1 }}x")
    with pytest.raises(ApiError, match="only one message, please"):
        load_chat_format(str(raising), bpe, None).prompt_ids(bpe, MESSAGES)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(ChatError, match="broken.jinja: Jinja syntax error"):
        load_chat_format(str(broken), bpe, None)
