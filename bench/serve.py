"""Benchmark: serving throughput and time to first token with continuous batching vs one request at a time.

    python bench/serve.py [--quick] [--new-tokens 64] [--models tiny,125M]

For each model the same checkpoint is served twice, by `tools/serve.py --max-batch-size 16` and
by `--max-batch-size 1` (requests served one by one; the rest wait in the queue). 1, 4 and 16
concurrent clients each stream completions of exactly --new-tokens tokens (min_tokens =
max_tokens, seeded sampling) from ~16-token prompts. Throughput = completion tokens / wall
time of the whole round; TTFT = request sent → first streamed token, median over the round.
Clients are coroutines of this process (on a small machine they share its cores with the
servers, in both settings alike); both servers run at once and rounds alternate between them. Goal (issue 15): >= 4x throughput at 16 clients.
"""
import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ru import GPTModel, ModelConfig  # noqa: E402
from megatron_ru.checkpoint.model_io import save_model  # noqa: E402
from tests.serve_helpers import ServerProcess, server_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer"
TOK_FLAGS = ["--vocab-file", str(TOKENIZER / "vocab.json"), "--merge-file", str(TOKENIZER / "merges.txt")]
MODELS = {  # name → (preset, overrides); the demo tokenizer's ids are a subset of any vocab
    "tiny": ("tiny-gpt3", dict(vocab_size=1815, max_position_embeddings=512)),
    "125M": ("rugpt3-small", dict(max_position_embeddings=512)),
}
CLIENTS = (1, 4, 16)
PROMPTS = ["Москва — столица России, крупнейший по численности населения город страны",
           "В начале было слово, и слово было у Бога, и слово было Бог. Оно было",
           "Жили-были дед да баба, и была у них курочка ряба. Снесла курочка яичко",
           "Привет! Как дела? Сегодня хорошая погода, и мы пойдём гулять в парк"]


async def one_request(http, i: int, new_tokens: int) -> tuple[float, int]:
    """Stream one completion; → (seconds to the first token, completion tokens)."""
    body = dict(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=new_tokens, min_tokens=new_tokens,
                temperature=0.8, seed=i, stream=True)
    t0, first, used = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if first is None:
                first = time.perf_counter() - t0
            if '"usage"' in line:
                used = json.loads(line[6:])["usage"]["completion_tokens"]
    return first, used


async def round_trip(url: str, clients: int, new_tokens: int) -> dict:
    """`clients` concurrent clients (one event loop), each sending requests back to back;
    max(clients, 4) requests in all."""
    todo = list(range(max(clients, 4)))
    ttfts, tokens = [], []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=3600, trust_env=False, limits=limits) as http:
        async def client():
            while todo:
                ttft, used = await one_request(http, todo.pop(), new_tokens)
                ttfts.append(ttft)
                tokens.append(used)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"tok_s": sum(tokens) / wall, "ttft_ms": 1000 * statistics.median(ttfts)}


def bench_model(name: str, new_tokens: int, repeats: int, threads: int, workdir: Path) -> list[dict]:
    preset, overrides = MODELS[name]
    path = workdir / name
    model = GPTModel(ModelConfig.from_preset(preset, **overrides), seed=1)
    params = sum(p.numel() for p in model.parameters())
    save_model(path, model, tag="release")
    del model
    rows = {c: {"model": f"{name} ({params / 1e6:.3g}M)", "clients": c} for c in CLIENTS}
    servers = {}
    try:
        for batch in (16, 1):  # both up at once; rounds alternate so machine noise hits both
            servers[batch] = ServerProcess([
                "--load", str(path), *TOK_FLAGS, "--seq-length", "512", "--max-batch-size",
                str(batch), "--max-queue", "64", "--max-tokens-limit", str(new_tokens)],
                env={**server_env(), "OMP_NUM_THREADS": str(threads)})
            asyncio.run(round_trip(servers[batch].url, 1, 4))  # warm-up
        for c in CLIENTS:
            for batch, srv in servers.items():
                runs = [asyncio.run(round_trip(srv.url, c, new_tokens)) for _ in range(repeats)]
                r = rows[c][f"b{batch}"] = {k: statistics.median(x[k] for x in runs)
                                            for k in runs[0]}
                print(f"  {name} max-batch {batch:2d}, {c:2d} clients: {r['tok_s']:7.1f} tok/s, "
                      f"p50 TTFT {r['ttft_ms']:7.1f} ms", file=sys.stderr, flush=True)
        for srv in servers.values():
            assert srv.terminate() == 0, srv.log
    finally:
        for srv in servers.values():
            srv.kill()
    return list(rows.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny model only")
    p.add_argument("--models", default="tiny,125M")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="rounds per cell (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the servers are stopped too
    names = ["tiny"] if args.quick else args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for name in names for r in bench_model(name, args.new_tokens, args.repeats, args.threads, Path(tmp))]
    print(f"\n{args.new_tokens} new tokens per request; tok/s = completion tokens / wall time; "
          "TTFT = p50 time to the first streamed token\n")
    print("| model | clients | tok/s, max-batch 16 | tok/s, max-batch 1 | ratio | "
          "p50 TTFT ms, batch 16 | p50 TTFT ms, batch 1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["b16"], r["b1"]
        print(f"| {r['model']} | {r['clients']} | {a['tok_s']:.1f} | {b['tok_s']:.1f} | "
              f"{a['tok_s'] / b['tok_s']:.2f}x | {a['ttft_ms']:.0f} | {b['ttft_ms']:.0f} |")


if __name__ == "__main__":
    main()
