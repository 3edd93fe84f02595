"""tools/serve.py end to end: a real server on a free localhost port driven by the real `openai` client
(completions, chat, streaming, greedy = generate.py, concurrent seeded requests = each alone,
errors as OpenAI JSON, API key, full queue, disconnect, SIGTERM) and TP=2 under real mpirun."""
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from megatron_ru import GPTModel, ModelConfig, runtime  # noqa: E402
from megatron_ru.checkpoint.model_io import save_model  # noqa: E402
from megatron_ru.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_ru.inference import runner  # noqa: E402
from tests.helpers import mpirun  # noqa: E402
from tests.serve_helpers import TOK_FLAGS, TOKENIZER, ServerProcess, metric, wait_until  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "test-key"
PROMPTS = ["Москва — столица", "В начале было слово", "Привет", "Жили-были дед да баба, и была у них"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny ruGPT-3 (2 layers) over the demo tokenizer, 2048 positions."""
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(TOKENIZER / "vocab.json"),
                          merge_file=str(TOKENIZER / "merges.txt"))
    cfg = ModelConfig.from_preset("tiny-gpt3", vocab_size=tok.vocab_size, init_method_std=0.2,
                                  max_position_embeddings=2048)
    path = tmp_path_factory.mktemp("serve_ckpt") / "tiny"
    save_model(path, GPTModel(cfg, None, seed=3), tag="iter_0000010")
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    """One server for most tests: 16 rows, a key, a small body limit."""
    with ServerProcess(["--load", str(checkpoint), *TOK_FLAGS, "--seq-length", "256",
                        "--max-batch-size", "16", "--max-queue", "16", "--api-key", KEY,
                        "--max-body-bytes", "20000", "--max-tokens-limit", "200"]) as srv:
        yield srv
        assert srv.terminate() == 0, srv.log
        assert "Traceback" not in srv.log


@pytest.fixture(scope="module")
def client(server):
    return server.openai(KEY)


def test_completions_and_chat_streamed_and_not(server, client):
    assert client.models.list().data[0].id == "tiny"
    out = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=8, n=2, seed=5,
                                    temperature=0.8, logprobs=2, echo=True)
    assert len(out.choices) == 4 and sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices) - \
        2 * out.usage.prompt_tokens  # echo: prompt tokens scored too, each prompt counted once
    for c in out.choices:
        assert c.text.startswith(PROMPTS[c.index // 2]) and c.finish_reason in ("stop", "length")
        assert c.logprobs.token_logprobs[0] is None  # the first prompt token has no context
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs[1:])
        assert all(len(top) == 2 for top in c.logprobs.top_logprobs[1:])
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, seed=9,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    whole = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, seed=9)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens > 0
    msgs = [{"role": "system", "content": "Ты бот."}, {"role": "user", "content": "Привет!"}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, seed=1,
                                          logprobs=True, top_logprobs=3)
    c = chat.choices[0]
    assert c.message.role == "assistant" and chat.usage.prompt_tokens > 5
    assert len(c.logprobs.content) == chat.usage.completion_tokens
    parts = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12,
                                                seed=1, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == c.message.content
    assert parts[-1].choices[0].finish_reason == c.finish_reason
    assert parts[-1].usage.total_tokens == chat.usage.total_tokens


def test_greedy_equals_generate_py(server, client, checkpoint, tmp_path):
    out_file = tmp_path / "gen.jsonl"
    code = runtime.run(runner.main, "generate.py", [
        "--load", str(checkpoint), *TOK_FLAGS, "--greedy", "--prompt", PROMPTS[3],
        "--out-seq-length", "24", "--seq-length", "256", "--quiet",
        "--sample-output-file", str(out_file)])
    assert code == 0
    ref = json.loads(out_file.read_text(encoding="utf-8"))
    got = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24, temperature=0)
    assert got.choices[0].text == ref["text"] and got.usage.completion_tokens == len(ref["tokens"])
    assert got.choices[0].finish_reason == {"eod": "stop"}.get(ref["finish_reason"], ref["finish_reason"])


def test_chat_renders_the_template_like_generate_py_chat(server, client, checkpoint, tmp_path):
    """The demo tokenizer has no chat template: the server uses the built-in rugpt3 dialogue
    style, exactly as generate.py --chat --chat-template rugpt3 (same prompt ids, same greedy
    reply; the server's extra "\nuser:" stop passed to generate.py too)."""
    from megatron_ru.data.chat_templates import load_template
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(TOKENIZER / "vocab.json"),
                          merge_file=str(TOKENIZER / "merges.txt"))
    msgs = [{"role": "system", "content": "Ты бот."}, {"role": "user", "content": PROMPTS[3]}]
    conversations = tmp_path / "chat.jsonl"
    conversations.write_text(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n", encoding="utf-8")
    out_file = tmp_path / "reply.jsonl"
    code = runtime.run(runner.main, "generate.py", [
        "--load", str(checkpoint), *TOK_FLAGS, "--chat", "--chat-template", "rugpt3", "--greedy",
        "--sample-input-file", str(conversations), "--out-seq-length", "20", "--stop", "\\nuser:",
        "--seq-length", "256", "--quiet", "--sample-output-file", str(out_file)])
    assert code == 0
    ref = json.loads(out_file.read_text(encoding="utf-8"))
    got = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0)
    assert got.usage.prompt_tokens == len(load_template("rugpt3", tok).prompt_ids(tok, msgs))
    assert got.choices[0].message.content == ref["text"]
    assert got.usage.completion_tokens == len(ref["tokens"])


def _request(i):
    return dict(model="tiny", prompt=PROMPTS[i % 4] * (1 + i % 3), max_tokens=6 + 5 * i, seed=100 + i,
                temperature=0.9, top_p=0.95,
                extra_body={"top_k": 0 if i % 2 else 40, "min_tokens": 3,
                            "repetition_penalty": 1.1 if i % 3 == 0 else 1.0})


def test_concurrent_seeded_streams_equal_each_alone(server, client):
    alone = [client.completions.create(**_request(i)).choices[0].text for i in range(16)]
    before = server.http().get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    start = threading.Barrier(16, timeout=60)

    def streamed(i):
        start.wait()
        return "".join(c.choices[0].text for c in client.completions.create(stream=True, **_request(i))
                       if c.choices)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(streamed, range(16)))
    assert together == alone
    assert len(set(alone)) == 16
    after = server.http().get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    rows = metric(after, "megatron_ru_serve_decoded_rows_total") - metric(before, "megatron_ru_serve_decoded_rows_total")
    steps = metric(after, "megatron_ru_serve_steps_total") - metric(before, "megatron_ru_serve_steps_total")
    assert rows / steps > 2.0, (rows, steps)  # really decoded together, not one by one


BAD = [  # (route, body or raw bytes, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": "tiny"}, 422, "prompt"),
    ("/v1/completions", {"prompt": 5}, 422, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "ten"}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 201}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "a", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "a", "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, 422, "stream"),
    ("/v1/completions", {"prompt": "a", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "слово " * 300}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "top_k": -1}, 400, "top_k"),
    ("/v1/completions", {"prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "a", "stop": 3}, 422, "stop"),
    ("/v1/completions", {"prompt": "x" * 30000}, 413, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 422, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"},
                                           {"role": "system", "content": "b"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/nowhere", {"prompt": "a"}, 404, None),
]


def test_malformed_bodies_get_openai_errors_and_server_keeps_serving(server, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    with server.http(headers=auth) as http:
        for route, body, status, param in BAD:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(route, content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (body if len(raw) < 200 else route, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err
            assert err["param"] == param, (body if len(raw) < 200 else route, err)
            assert "Traceback" not in r.text
        r = http.get("/v1/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert http.get("/health").json() == {"status": "ok"}
    assert client.completions.create(model="tiny", prompt="a", max_tokens=3).usage.completion_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        server.openai("wrong-key").completions.create(model="tiny", prompt="a", max_tokens=2)
    with server.http() as http:
        assert http.post("/v1/completions", json={"prompt": "a"}).status_code == 401
        assert http.get("/metrics").status_code == 401
        assert http.get("/health").status_code == 200  # open: for load balancers


def test_full_queue_429_disconnect_frees_row_sigterm_finishes(checkpoint):
    """One row and a queue of one: a long stream holds the row, a second waits, a third is
    refused; closing the first lets the second run; SIGTERM lets a running request finish."""
    srv = ServerProcess(["--load", str(checkpoint), *TOK_FLAGS, "--seq-length", "2048",
                         "--max-batch-size", "1", "--max-queue", "1", "--max-tokens-limit", "4000"])
    with srv, srv.http() as http:
        long = dict(prompt="Привет", max_tokens=2000, min_tokens=2000, stream=True)
        with http.stream("POST", "/v1/completions", json=long) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # running: the row is taken
            with http.stream("POST", "/v1/completions", json=dict(prompt="Пока", max_tokens=5,
                                                                 stream=True)) as second:
                assert second.status_code == 200  # admitted: waits in the queue
                third = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
                assert third.status_code == 429 and third.headers["retry-after"] == "1"
                assert third.json()["error"]["code"] == "queue_full"
                first.close()  # the client goes away mid-stream
                rest = [line for line in second.iter_lines() if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] > 0
        assert wait_until(lambda: "finish=cancelled" in srv.log, 30), srv.log
        cancelled = [line for line in srv.lines if "finish=cancelled" in line][0]
        assert 0 < int(cancelled.split("completion_tokens=")[1].split()[0]) < 2000, cancelled
        text = http.get("/metrics").text
        assert metric(text, 'megatron_ru_serve_sequences_finished_total{reason="cancelled"}') == 1
        assert metric(text, "megatron_ru_serve_running_rows") == 0
        # SIGTERM while a request runs: it finishes, then the server exits 0
        with http.stream("POST", "/v1/completions", json=dict(long, max_tokens=300,
                                                             min_tokens=300)) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")
            assert srv.terminate() == 0, srv.log
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 300
        assert "stopped" in srv.lines[-1] and "Traceback" not in srv.log


@pytest.mark.mpirun
def test_tp2_under_mpirun_serves_like_tp1(server, client, checkpoint):
    bodies = [dict(model="tiny", prompt=PROMPTS[3], max_tokens=16, temperature=0),
              dict(model="tiny", prompt=PROMPTS[:2], max_tokens=10, n=2, seed=11, temperature=0.8)]
    ref = [[c.text for c in client.completions.create(**b).choices] for b in bodies]
    srv = ServerProcess(["--load", str(checkpoint), *TOK_FLAGS, "--seq-length", "256",
                         "--max-batch-size", "4"], mpirun=mpirun(), np_=2)
    with srv:
        assert "tp=0/2" in srv.log
        tp2 = srv.openai()
        got = [[c.text for c in tp2.completions.create(**b).choices] for b in bodies]
        parts = list(tp2.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Привет"}], max_tokens=8, seed=2,
            stream=True))
        assert parts[-1].choices[0].finish_reason in ("stop", "length")
        assert srv.terminate() == 0, srv.log
    assert got == ref
    assert "stopped" in srv.log and "Traceback" not in srv.log


def test_quantized_server_requests_equal_each_alone(checkpoint):
    """--quantize int8 --quantize-head: fbgemm would quantize a batch's activations on one grid
    (a request's tokens would depend on its neighbours); the server uses per-token scales, so
    seeded and greedy requests decoded together equal each alone."""
    with ServerProcess(["--load", str(checkpoint), *TOK_FLAGS, "--quantize", "int8",
                        "--quantize-head", "--seq-length", "256", "--max-batch-size", "4"]) as srv:
        client = srv.openai()
        bodies = [dict(model="tiny", prompt=PROMPTS[i] * (1 + i), max_tokens=12 + 4 * i, seed=7 + i,
                       temperature=0 if i == 3 else 1.0) for i in range(4)]
        alone = [client.completions.create(**b).choices[0].text for b in bodies]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda b: client.completions.create(**b).choices[0].text, bodies))
        assert srv.terminate() == 0, srv.log
    assert together == alone and len(set(alone)) == 4


@pytest.mark.parametrize("flags,message", [
    (["--chat-template", "nowhere.jinja"], "--chat-template nowhere.jinja: neither a built-in"),
    (["--chat"], "--chat is a generate.py flag"),
    (["--max-batch-size", "0"], "--max-batch-size 0 must be >= 1"),
])
def test_bad_serve_flags_exit_2_before_loading(checkpoint, capsys, flags, message):
    from megatron_ru.serving import cli as serve
    assert runtime.run(serve.main, "tools/serve.py", ["--load", str(checkpoint), *TOK_FLAGS, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
