"""tools/serve.py against abusive requests: a real server on 127.0.0.1 (tiny model) while each abuse runs,
a concurrent /health probe and a 5-token request both answer within a second; every client error
is a 4xx with OpenAI's error JSON; SIGTERM drains (health 503 first) and a forced shutdown ends
streams with an error event and [DONE]."""
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from megatron_ru import GPTModel, ModelConfig  # noqa: E402
from megatron_ru.checkpoint.model_io import save_model  # noqa: E402
from megatron_ru.data.tokenizers import build_tokenizer  # noqa: E402
from tests.serve_helpers import TOK_FLAGS, TOKENIZER, ServerProcess, metric  # noqa: E402

pytestmark = pytest.mark.slow

LETTERS = "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"
JSON = {"Content-Type": "application/json"}


def random_checkpoint(path, **shape):
    """A randomly initialised tiny-gpt3 (2,048 positions) over the demo tokenizer, saved at `path`."""
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(TOKENIZER / "vocab.json"),
                          merge_file=str(TOKENIZER / "merges.txt"))
    cfg = ModelConfig.from_preset("tiny-gpt3", vocab_size=tok.vocab_size, init_method_std=0.2,
                                  max_position_embeddings=2048, **shape)
    save_model(path, GPTModel(cfg, None, seed=3), tag="iter_0000010")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("abuse_ckpt") / "tiny")


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    """A model whose 2,000-token stream outlasts --shutdown-timeout on any CPU (the tiny one streams
    2,000 tokens in under 3 s on an idle 2-core machine, so nothing would be left to cut)."""
    return random_checkpoint(tmp_path_factory.mktemp("abuse_slow_ckpt") / "slow", hidden_size=512,
                             num_layers=8, num_attention_heads=8)


@pytest.fixture(scope="module")
def slow_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret_templates") / "loops.jinja"
    path.write_text("{% if messages[0]['content'] == 'spin' %}{% for i in range(100000) %}"
                    "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
                    "{% if messages[0]['content'] == 'boom' %}{{ raise_exception('refused') }}{% endif %}"
                    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}bot:{% endif %}", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(checkpoint, slow_template):
    with ServerProcess(["--load", str(checkpoint), *TOK_FLAGS, "--seq-length", "2048",
                        "--max-batch-size", "4", "--max-tokens-limit", "2000",
                        "--max-body-bytes", str(1_200_000), "--prompt-timeout", "1",
                        "--header-timeout", "2", "--body-timeout", "2",
                        "--chat-template", str(slow_template)]) as srv:
        yield srv
        assert srv.terminate() == 0, srv.log
        assert "Traceback" not in srv.log


def responsive(srv, abuse, *, during_s: float = 0.0):
    """Run `abuse()` on a thread; meanwhile /health and a 5-token request must each answer
    within 1 s. Returns what abuse() returned."""
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("r", abuse()), daemon=True)
    worker.start()
    time.sleep(0.3 + during_s)
    with srv.http(timeout=10) as http:
        t0 = time.perf_counter()
        assert http.get("/health").status_code == 200
        t_health = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = http.post("/v1/completions", json={"prompt": "Привет", "max_tokens": 5})
        t_small = time.perf_counter() - t0
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0, r.text
    assert t_health < 1.0 and t_small < 1.0, (t_health, t_small)
    worker.join(120)
    return box.get("r")


def error_of(r, status):
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_one_huge_word_is_refused_at_once_while_others_are_served(server):
    word = "".join(random.Random(0).choice(LETTERS) for _ in range(500_000))  # 1 MB
    timing = {}

    def abuse():
        with server.http() as http:
            t0 = time.perf_counter()
            r = http.post("/v1/completions", json={"prompt": word, "max_tokens": 5})
            timing["s"] = time.perf_counter() - t0
            return r

    err = error_of(responsive(server, abuse), 400)
    assert err["code"] == "context_length_exceeded" and timing["s"] < 5, timing


def test_long_stream_with_many_long_stops_does_not_stall_others(server):
    rng = random.Random(1)
    stops = ["".join(rng.choice("абвгд") for _ in range(1000)) for _ in range(16)]
    with server.http() as http:
        too_long = http.post("/v1/completions", json={"prompt": "a", "stop": ["x" * 30_000]})
        assert error_of(too_long, 400)["param"] == "stop"

    def abuse():
        with server.http() as http:
            body = {"prompt": "Москва", "max_tokens": 1500, "min_tokens": 1500, "stream": True,
                    "stop": stops}
            with http.stream("POST", "/v1/completions", json=body) as r:
                return [line for line in r.iter_lines() if line]

    lines = responsive(server, abuse, during_s=1.0)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 1500


def test_template_that_loops_for_ever_is_stopped_and_paths_stay_private(server, slow_template):
    def abuse():
        with server.http() as http:
            return http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "spin"}], "max_tokens": 3})

    err = error_of(responsive(server, abuse), 400)
    assert err["code"] == "template_too_slow" and "took too long" in err["message"]
    with server.http() as http:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "boom"}]})
        err = error_of(r, 400)
        assert "refused" in err["message"] and str(slow_template.parent) not in r.text
        ok = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 3})
        assert ok.status_code == 200


def test_malformed_requests_are_4xx_never_500(server):
    with server.http() as http:
        cases = [
            (dict(content=b'{"prompt": "a"}', headers={"Content-Type": "text/plain"}), 415),
            (dict(content=b'{"prompt": "a"}'), 415),
            (dict(content=b'{"prompt": "a"}', headers={**JSON, "Host": "evil.example"}), 421),
            (dict(content=b'{"prompt": "\\ud800", "max_tokens": 2}', headers=JSON), 400),
            (dict(content=b'{"messages": [{"role": "user", "content": "\\udfff"}]}', headers=JSON),
             400),
            (dict(content=b"[" * 100_000 + b"]" * 100_000, headers=JSON), 400),
            (dict(content=b'{"prompt": ' + b"[" * 200 + b"1" + b"]" * 200 + b"}", headers=JSON), 400),
        ]
        for kwargs, status in cases:
            route = "/v1/chat/completions" if b"messages" in kwargs["content"] else "/v1/completions"
            error_of(http.post(route, **kwargs), status)
        assert http.get("/health", headers={"Host": "attacker.example"}).status_code == 421
    host, port = server.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port))) as s:  # goes away mid-upload
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                  b"application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
        time.sleep(0.3)
    time.sleep(0.5)
    with server.http() as http:
        text = http.get("/metrics").text
    assert "status=\"500\"" not in text, text


def test_api_key_non_ascii(checkpoint):
    key = "ключ-секрет"
    with ServerProcess(["--load", str(checkpoint), *TOK_FLAGS, "--seq-length", "64",
                        "--api-key", key]) as srv:
        with srv.http() as http:
            body = b'{"prompt": "a", "max_tokens": 2}'
            for header in ["Bearer ключ".encode("utf-8"), "Bearer é".encode("latin-1"), b"Bearer \xff"]:
                r = http.post("/v1/completions", content=body,
                              headers=[(b"Content-Type", b"application/json"), (b"Authorization", header)])
                error_of(r, 401)
            r = http.post("/v1/completions", content=body,
                          headers=[(b"Content-Type", b"application/json"),
                                   (b"Authorization", ("Bearer " + key).encode("utf-8"))])
            assert r.status_code == 200, r.text
            assert http.get("/health", headers={"Host": "any.example"}).status_code == 200  # keyed
        assert srv.terminate() == 0 and "Traceback" not in srv.log


def test_half_open_connections_are_capped_and_timed_out(checkpoint):
    with ServerProcess(["--load", str(checkpoint), *TOK_FLAGS, "--seq-length", "64",
                        "--max-connections", "150", "--header-timeout", "1.5"]) as srv:
        host, port = srv.url.rsplit("/", 1)[1].split(":")
        socks = []
        for _ in range(300):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            socks.append(s)
        time.sleep(0.5)
        refused = 0
        for s in socks[150:]:
            s.settimeout(2)
            data = s.recv(4096)
            refused += b" 503 " in data and b"too_many_connections" in data
        assert refused >= 140, refused
        time.sleep(2.0)  # past the head deadline: the first 150 are closed by the server
        closed = 0
        for s in socks[:150]:
            s.settimeout(2)
            try:
                closed += s.recv(4096) == b""
            except OSError:
                closed += 1
        for s in socks:
            s.close()
        assert closed == 150, closed
        with srv.http(timeout=5) as http:
            assert http.get("/health").status_code == 200
        assert srv.terminate() == 0
        assert len(srv.lines) < 60, srv.log[-3000:]  # no line per connection


def test_sigterm_drains_then_cuts_streams_with_an_error_event(slow_checkpoint):
    with ServerProcess(["--load", str(slow_checkpoint), *TOK_FLAGS, "--seq-length", "2048",
                        "--max-tokens-limit", "2000", "--drain-seconds", "1.5",
                        "--shutdown-timeout", "3"]) as srv, srv.http() as http:
        body = {"prompt": "Привет", "max_tokens": 2000, "min_tokens": 2000, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")
            t0 = time.monotonic()
            srv.proc.send_signal(15)
            time.sleep(0.5)
            with httpx.Client(base_url=srv.url, trust_env=False, timeout=5) as probe:
                health = probe.get("/health")  # the listener is still open while draining
                late = probe.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
            assert error_of(health, 503)["code"] == "shutting_down"
            assert error_of(late, 503)["code"] == "shutting_down"
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["error"]["code"] == "shutting_down"
        assert 2.5 < time.monotonic() - t0 < 15
        assert srv.proc.wait(30) == 0 and "Traceback" not in srv.log


def test_many_concurrent_clients_stay_bounded(server):
    """A few hundred connections at once: all answered (200 or a 4xx/503), none lost."""
    def one(i):
        with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as http:
            return http.get("/health").status_code

    with ThreadPoolExecutor(64) as pool:
        codes = list(pool.map(one, range(300)))
    assert set(codes) <= {200, 503} and codes.count(200) > 250
    with server.http() as http:
        assert metric(http.get("/metrics").text, 'megatron_ru_serve_requests_total{route="/health",status="500"}') == 0
