"""The server's bounds on CPU work, on real tokenizer files: BPE linear in a word's length with the same
ids as before (a rescanning reference, and Hugging Face `tokenizers`), stop strings found
incrementally (equal to rescanning, linear in the stream), chat templates stopped by their time
limit and size bounds, request-body checks, the worker threads' deadline, bounded logs."""
import asyncio
import json
import logging
import random
import time
from pathlib import Path

import pytest

from megatron_ru.data.chat_templates import ChatError, ChatTemplate
from megatron_ru.data.tokenizers import build_tokenizer
from megatron_ru.inference.text import StopStrings, TextStream
from megatron_ru.serving.connections import RepeatFilter
from megatron_ru.serving.guards import check_values, default_allowed_hosts, host_name
from megatron_ru.serving.offload import Offload, prompt_bytes_limit
from megatron_ru.serving.protocol import ApiError

ROOT = Path(__file__).resolve().parents[2]
TOK = ROOT / "examples" / "data" / "tokenizer"
LETTERS = "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("GPT2BPETokenizer", vocab_file=str(TOK / "vocab.json"),
                           merge_file=str(TOK / "merges.txt"))


def rescanning_bpe(ranks, word):
    """The classic loop: merge every occurrence of the lowest-ranked pair, rescan."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks[p], p) for p in zip(parts, parts[1:]) if p in ranks]
        if not pairs:
            break
        a, b = min(pairs)[1]
        out, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return parts


def test_bpe_ids_unchanged_and_linear_in_a_word(tok):
    rng = random.Random(0)
    words = ["".join(rng.choice(LETTERS + "abcxyz") for _ in range(rng.randint(1, 3000)))
             for _ in range(30)] + ["а" * 999, "ab" * 500, "aaa", "x"]
    table = tok._byte_table
    for w in words:
        mapped = w.encode("utf-8").decode("latin-1").translate(table)
        assert tok._bpe(mapped) == rescanning_bpe(tok.bpe_ranks, mapped)
    text = (ROOT / "examples" / "data" / "ru_demo.txt").read_text(encoding="utf-8")
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(TOK / "vocab.json"),
                                                              str(TOK / "merges.txt")))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    for sample in [text, "".join(words[:5]), "Ёжик, 42 ёлки — «ура»!  \n\tok 🙂"]:
        assert tok.tokenize(sample) == hf.encode(sample).ids
    word = "".join(rng.choice(LETTERS) for _ in range(200_000))
    t0 = time.perf_counter()
    ids = tok.tokenize(word)
    assert time.perf_counter() - t0 < 15 and len(ids) > 10_000  # the rescanning loop: ~20 s


def naive_safe(stops, text):
    cut = stops.truncate(text)
    if len(cut) < len(text):
        return len(cut)
    held = max([n for s in stops.strings for n in range(1, len(s)) if text.endswith(s[:n])],
               default=0)
    return len(text) - held


def test_incremental_stop_strings_equal_rescanning_and_stay_linear(tok):
    rng = random.Random(1)
    for _ in range(200):
        stops = StopStrings(["".join(rng.choice("ab") for _ in range(rng.randint(1, 5)))
                             for _ in range(rng.randint(1, 4))], lambda ids: "".join(ids))
        text = "".join(rng.choice("abc") for _ in range(40))
        stream = TextStream(lambda ids: "".join(ids), stops)
        best = 0
        for i, ch in enumerate(text):
            stream.push(ch)
            best = max(best, naive_safe(stops, text[:i + 1]))
            assert stream.emitted == best, (stops.strings, text[:i + 1])
        if stops.truncate(text) == text:
            assert stops.holdback(text) == len(text) - naive_safe(stops, text)
    ids = tok.tokenize("Москва столица России и большой город. " * 400)[:4000]
    long_stops = StopStrings(["".join(rng.choice("абвгд") for _ in range(30_000)) for _ in range(16)],
                             tok.detokenize)
    stream = TextStream(tok.detokenize, long_stops)
    t0 = time.perf_counter()
    printed = "".join(stream.push(t) for t in ids)
    assert time.perf_counter() - t0 < 10  # rescanning: ~150 s
    assert printed == tok.detokenize(ids)[:len(printed)] and len(printed) > 8000


def test_chat_template_time_limit_and_size_bounds():
    slow = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                        "{% endfor %}", name="--chat-template /srv/secret/t.jinja")
    t0 = time.perf_counter()
    with pytest.raises(ChatError, match="took too long"):
        slow.render([], time_limit_s=0.3)
    assert time.perf_counter() - t0 < 3
    for source in ["{{ 'a' * 1000000000 }}", "{{ '%0999999999d' % 1 }}", "{{ 2 ** 100000000 }}",
                   "{{ 1 / 0 }}", "{{ range(10**9) | list }}"]:
        with pytest.raises(ChatError):
            ChatTemplate(source).render([], time_limit_s=2)
    assert ChatTemplate("{{ 'ab' * 2 }}{{ '%3d' % 7 }}").render([]) == "abab  7"


def test_chat_errors_do_not_name_server_paths(tok, tmp_path):
    from megatron_ru.serving.chat_prompt import ChatFormat
    path = tmp_path / "secret" / "t.jinja"
    fmt = ChatFormat(ChatTemplate("{{ raise_exception('no at ' ~ '/opt/models/x/y.txt') }}",
                                  name=f"--chat-template {path}"))
    with pytest.raises(ApiError) as err:
        fmt.prompt_ids(tok, [{"role": "user", "content": "hi"}], 1.0)
    assert err.value.status == 400 and str(tmp_path) not in err.value.message
    assert "/opt/models" not in err.value.message and "y.txt" in err.value.message
    assert ChatFormat(ChatTemplate("{{ messages[0]['content'] }}")).prompt_ids(
        tok, [{"role": "user", "content": "Привет"}], 1.0, 1000) == tok.tokenize("Привет")
    assert prompt_bytes_limit(tok, 100) >= 100


def test_request_body_checks():
    deep = json.loads("[" * 500 + "]" * 500)
    assert not check_values(deep, 64) and check_values({"a": [{"b": "ё"}]}, 64)
    with pytest.raises(ApiError, match="surrogate"):
        check_values({"prompt": ["ok", "\ud800"]}, 64)
    assert host_name("LocalHost:8000") == "localhost" and host_name("[::1]:80") == "::1"
    assert host_name("evil.example.") == "evil.example" and host_name(None) is None
    assert "localhost" in default_allowed_hosts("127.0.0.1", None)
    assert default_allowed_hosts("127.0.0.1", "key") is None
    assert default_allowed_hosts("0.0.0.0", None) is None


def test_offload_deadline_and_busy():
    async def run():
        off = Offload(workers=1, timeout_s=0.3)
        assert await off.run(lambda: 41 + 1) == 42
        with pytest.raises(ApiError) as slow:
            await off.run(time.sleep, 1.0)
        assert slow.value.status == 400
        with pytest.raises(ApiError) as busy:  # the slot is held until the thread ends
            await off.run(lambda: 1)
        assert busy.value.status == 503
        await asyncio.sleep(1.0)
        assert await off.run(lambda: 2) == 2
        with pytest.raises(ValueError):
            await off.run(int, "x")
    asyncio.run(run())


def test_repeated_log_lines_are_bounded():
    f = RepeatFilter(burst=3, window_s=60)
    rec = [logging.LogRecord("asyncio", logging.ERROR, "", 0, "accept failed", (), None)
           for _ in range(1000)]
    assert sum(f.filter(r) for r in rec) == 3
