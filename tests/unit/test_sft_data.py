"""SFT data: loss masks per input form, chat templates = transformers' apply_chat_template, the
preprocessing CLI and its bad-input messages, padded / packed rows."""
import json
import os

import numpy as np
import pytest

from megatron_ru.data.chat_templates import BUILTINS, ChatError, ChatTemplate, load_template
from megatron_ru.data.sft_examples import SFTDataset, mask_prefix, record_to_example, sft_batch
from megatron_ru.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_ru.data.order import DatasetConfigError
from megatron_ru.data.tokenizers import build_tokenizer
from tests.helpers import TOKENIZER

TOK_DIR = str(TOKENIZER)
CONVERSATION = [{"role": "system", "content": "Ты помощник."},
                {"role": "user", "content": "Сколько будет 2+2?"},
                {"role": "assistant", "content": "Четыре."},
                {"role": "user", "content": "А 3+3?"},
                {"role": "assistant", "content": "Шесть."}]


def pieces_mask(tok, pieces):
    """The hand-computed mask: (text, in loss?) pieces tokenized one by one (the pieces end where
    the BPE pre-tokenizer splits anyway) plus the end-of-text id where a piece is None."""
    ids, mask = [], []
    for text, target in pieces:
        part = [tok.eod] if text is None else tok.tokenize(text)
        ids += part
        mask += [int(target)] * len(part)
    return ids, mask


def test_masks_by_hand_multi_turn_system(bpe):
    template = load_template("rugpt3", bpe)
    ids, mask = record_to_example({"messages": CONVERSATION}, template=template, tokenizer=bpe)
    expected = pieces_mask(bpe, [("system: Ты помощник.\nuser: Сколько будет 2+2?\nbot: ", 0),
                                 ("Четыре.", 1), (None, 1), ("\nuser: А 3+3?\nbot: ", 0),
                                 ("Шесть.", 1), (None, 1)])
    assert (ids, mask) == expected
    ids2, mask2 = record_to_example({"messages": CONVERSATION}, template=template, tokenizer=bpe,
                                    train_on_prompt=True)
    assert ids2 == ids and mask2 == [1] * len(ids)


def test_masks_by_hand_prompt_response_and_text(bpe):
    template = load_template("rugpt3", bpe)
    rec = {"q": "Привет", "a": "Здравствуй", "system": "Будь краток."}
    ids, mask = record_to_example(rec, template=template, tokenizer=bpe, prompt_key="q", response_key="a")
    assert (ids, mask) == pieces_mask(bpe, [("system: Будь краток.\nuser: Привет\nbot: ", 0),
                                            ("Здравствуй", 1), (None, 1)])
    ids, mask = record_to_example({"text": "Просто текст."}, template=template, tokenizer=bpe)
    assert ids == bpe.tokenize("Просто текст.") + [bpe.eod] and mask == [1] * len(ids)


@pytest.mark.parametrize("record,match", [
    ({"prompt": "Вопрос", "response": "  "}, "assistant message 1 is empty"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "b"}]}, "system message may only come first"),
    ({"messages": []}, "non-empty list"),
    ({"prompt": "a"}, "must both be strings"),
    ({"question": "a"}, "expected 'messages'"),
    # training conversations: optional system, then user / assistant alternating, ending with a reply
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "message 0 is 'assistant' where 'user' is expected"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                   {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
     "message 2 is 'user' where 'assistant' is expected"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "message 2 is 'assistant' where 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "ends with a user message; training data ends"),
])
def test_bad_conversations_rejected(bpe, record, match):
    with pytest.raises(ChatError, match=match):
        record_to_example(record, template=load_template("rugpt3", bpe), tokenizer=bpe, where="f.jsonl:3")


def test_template_without_assistant_marker(bpe):
    t = ChatTemplate("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", name="plain.jinja")
    with pytest.raises(ChatError, match="plain.jinja has no assistant marker"):
        t.encode(bpe, CONVERSATION[1:3])


def test_rugpt3_equals_transformers(bpe):
    from transformers import GPT2Tokenizer
    hf = GPT2Tokenizer(f"{TOK_DIR}/vocab.json", f"{TOK_DIR}/merges.txt")
    template = load_template("rugpt3", bpe)
    for messages, gen in ((CONVERSATION, False), (CONVERSATION[:4], True), (CONVERSATION[:2], True)):
        text = hf.apply_chat_template(messages, chat_template=BUILTINS["rugpt3"], tokenize=False,
                                      add_generation_prompt=gen)
        assert template.render(messages, gen) == text
    # a first prompt: the same ids; with replies, ours are cut at the replies' edges ("bot: " |
    # "Четыре.", so that training and generation agree on the space before a reply)
    ids = hf.apply_chat_template(CONVERSATION[:2], chat_template=BUILTINS["rugpt3"], tokenize=True,
                                 add_generation_prompt=True, return_dict=False)
    assert template.prompt_ids(bpe, CONVERSATION[:2]) == list(ids)
    text, spans = template.assistant_spans(CONVERSATION)
    edges = [0, *[c for span in spans for c in span]]
    pieces = [text[a:b] for a, b in zip(edges, edges[1:])]
    assert template.encode(bpe, CONVERSATION).ids == [
        i for piece in pieces for i in hf(piece.replace("<|endoftext|>", ""))["input_ids"] +
        ([bpe.eod] if piece.endswith("<|endoftext|>") else [])]


def test_llama3_and_tokenizer_config_equal_transformers(llama_tok_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(llama_tok_dir / "tokenizer.json"))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(llama_tok_dir / "tokenizer.json"),
                                 bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    template = load_template("llama3", tok)
    enc = template.encode(tok, CONVERSATION)
    assert enc.text == hf.apply_chat_template(CONVERSATION, chat_template=BUILTINS["llama3"], tokenize=False)
    assert enc.ids == list(hf.apply_chat_template(CONVERSATION, chat_template=BUILTINS["llama3"],
                                                  tokenize=True, return_dict=False))
    eot = tok.tok.token_to_id("<|eot_id|>")
    assert template.eot_id(tok) == eot
    # the reply tokens and their <|eot_id|> are the targets, nothing else
    targets = [i for i, m in zip(enc.ids, enc.loss_mask) if m]
    assert targets == tok.tokenize("Четыре.") + [eot] + tok.tokenize("Шесть.") + [eot]

    custom = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}\n{{ m['content'] }}"
              "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant\n{% endif %}")
    (llama_tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "chat_template": custom}))
    hf2 = AutoTokenizer.from_pretrained(str(llama_tok_dir))
    template = load_template(None, tok, str(llama_tok_dir))
    enc = template.encode(tok, CONVERSATION)
    assert enc.text == hf2.apply_chat_template(CONVERSATION, tokenize=False)
    assert enc.ids == list(hf2.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False))
    assert [i for i, m in zip(enc.ids, enc.loss_mask) if m] == \
        tok.tokenize("Четыре.") + [eot] + tok.tokenize("Шесть.") + [eot]


def test_preprocess_cli_writes_pair_and_rejects_bad_lines(tmp_path, bpe, capsys):
    from tools import preprocess_data
    src = tmp_path / "chat.jsonl"
    rows = [{"messages": CONVERSATION}, {"prompt": "Привет", "response": "Здравствуй"}, {"text": "Текст."}]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    common = ["--dataset-type", "sft", "--chat-template", "rugpt3", "--tokenizer-type", "GPT2BPETokenizer",
              "--vocab-file", f"{TOK_DIR}/vocab.json", "--merge-file", f"{TOK_DIR}/merges.txt"]
    out = str(tmp_path / "out" / "chat")
    assert preprocess_data.main(["--input", str(src), "--output-prefix", out, *common]) == 0
    ids, masks = IndexedDataset(out), IndexedDataset(mask_prefix(out))
    template = load_template("rugpt3", bpe)
    for i, row in enumerate(rows):
        want_ids, want_mask = record_to_example(row, template=template, tokenizer=bpe)
        assert ids.document(i).tolist() == want_ids and masks.document(i).tolist() == want_mask
    assert masks.dtype == np.uint8
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONVERSATION}) + "\n{\"prompt\": \"x\", \"response\": \"\"}\n")
    assert preprocess_data.main(["--input", str(bad), "--output-prefix", str(tmp_path / "bad"), *common]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: assistant message 1 is empty" in err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("bad") and not p.endswith(".jsonl")]


def test_prompts_may_end_with_the_user_turn(bpe):
    """Generation and the server share check_messages: only training data gets the strict order."""
    from megatron_ru.data.chat_templates import check_messages
    prompt = CONVERSATION[:4]
    assert check_messages(prompt) == prompt
    assert load_template("rugpt3", bpe).prompt_ids(bpe, prompt)
    with pytest.raises(ChatError, match="ends with a user message"):
        check_messages(prompt, training=True)


@pytest.mark.parametrize("line,message", [
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "not valid UTF-8 (invalid start byte"),
    (b'{"prompt": "x\\ud800", "response": "y"}', "lone surrogate \\ud800"),
    (b'{"messages": [{"role": "\\udfff", "content": "y"}]}', "lone surrogate \\udfff"),
])
def test_preprocess_cli_names_bad_text_with_file_and_line(tmp_path, capsys, line, message):
    from tools import preprocess_data
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": CONVERSATION}, ensure_ascii=False).encode("utf-8")
    bad.write_bytes(good + b"\n" + line + b"\n")
    common = ["--dataset-type", "sft", "--chat-template", "rugpt3", "--tokenizer-type", "GPT2BPETokenizer",
              "--vocab-file", f"{TOK_DIR}/vocab.json", "--merge-file", f"{TOK_DIR}/merges.txt"]
    assert preprocess_data.main(["--input", str(bad), "--output-prefix", str(tmp_path / "out"), *common]) == 2
    err = capsys.readouterr().err
    assert f"preprocess_data.py: error: {bad}:2: " in err and message in err and "Traceback" not in err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


@pytest.fixture()
def toy_pair(tmp_path):
    """Five conversations of lengths 5..9 (ids 100*(i+1) + j); token j >= 2 is a target."""
    prefix, lengths = str(tmp_path / "toy"), [5, 9, 6, 8, 7]
    with IndexedDatasetBuilder(prefix, np.int32) as ids, \
            IndexedDatasetBuilder(mask_prefix(prefix), np.uint8) as masks:
        for i, n in enumerate(lengths):
            ids.add_document(np.arange(n) + 100 * (i + 1))
            masks.add_document((np.arange(n) >= 2).astype(np.uint8))
    return prefix, lengths


def test_pad_and_packed_rows(toy_pair):
    prefix, lengths = toy_pair
    pad = SFTDataset(prefix, np.arange(5), name="train", seq_length=15, num_samples=None, seed=1, packing="pad")
    assert len(pad) == 5
    row = pad[0]
    doc = int(np.unique(row["segment"][row["segment"] >= 0]).size)
    assert doc == 1 and (row["segment"] == -1).sum() == 16 - (row["text"] >= 100).sum()
    packed = SFTDataset(prefix, np.arange(5), name="train", seq_length=15, num_samples=None, seed=1,
                        packing="packed")
    assert len(packed) < 5 and sum(len(r) for r in packed.rows) == 5
    assert sorted(d for r in packed.rows for d in r) == list(range(5))
    b = sft_batch({k: np.stack([packed[i][k] for i in range(len(packed))]) for k in ("text", "loss_mask", "segment")},
                  packed=True)
    # targets: token j >= 2 of each conversation, never the first token of the next one
    assert int(b["loss_mask"].sum()) == sum(n - 2 for n in lengths)
    first = (b["tokens"] % 100 == 0) & (b["tokens"] >= 100)
    assert bool((b["position_ids"][first] == 0).all())


def test_overlong_truncated_with_warning_or_error(toy_pair):
    prefix, _ = toy_pair
    with pytest.warns(UserWarning, match="1 of 5 conversations are longer than 8 tokens"):
        ds = SFTDataset(prefix, np.arange(5), name="train", seq_length=7, num_samples=None, seed=1)
    assert all((ds[i]["segment"] >= 0).sum() <= 8 for i in range(len(ds)))
    with pytest.raises(DatasetConfigError, match="--sft-overlong truncate cuts them"):
        SFTDataset(prefix, np.arange(5), name="train", seq_length=7, num_samples=None, seed=1, overlong="error")


def test_sft_prefixes_are_validated_like_pretraining_data(toy_pair):
    """Ids beyond the run's vocabulary and loss-mask values other than 0/1 stop before compute,
    naming the prefix and the first bad document."""
    from megatron_ru.data.sft_examples import build_sft_datasets
    from megatron_ru.data.validate import DataValidationError
    prefix, _ = toy_pair
    train, _, _ = build_sft_datasets([prefix], "100,0,0", 15, 1, (5, 0, 0), vocab_size=1000)
    assert len(train) == 5
    with pytest.raises(DataValidationError, match=r"toy: token id 500 in document 4 .* outside the "
                                                  r"tokenizer's vocabulary of 500"):
        build_sft_datasets([prefix], "100,0,0", 15, 1, (5, 0, 0), vocab_size=500)
    bad = prefix + "_bad"
    with IndexedDatasetBuilder(bad, np.int32) as ids, IndexedDatasetBuilder(mask_prefix(bad), np.uint8) as masks:
        ids.add_document(np.arange(4))
        masks.add_document(np.array([0, 1, 2, 1], dtype=np.uint8))
    with pytest.raises(DataValidationError, match="toy_bad_loss_mask: loss-mask values 0..2, expected 0 or 1"):
        build_sft_datasets([bad], "100,0,0", 15, 1, (1, 0, 0), vocab_size=1000)
