"""responses.event_stream, the one SSE loop of /v1/completions and /v1/chat/completions: opening
chunks first, a chunk per update with something to say, the usage on the last chunk (or in its own
chunk with include_usage), then [DONE]; driven by real Seq sinks on a real event loop."""
import asyncio
import json

import pytest

from megatron_ru.inference.sampling import GREEDY
from megatron_ru.serving.responses import Choice, Handle, event_stream
from megatron_ru.serving.scheduler import Seq, SeqOptions


def detokenize(ids):
    return "".join(chr(ord("a") + i) for i in ids)


def head(choices):
    return {"object": "text_completion", "choices": choices}


def entry(u):  # as the completions route: logprobs only with tokens
    return {"index": u.choice.index, "text": u.text,
            "logprobs": [e[0] for e in u.entries] if u.tokens and u.entries[0] else None,
            "finish_reason": u.choice.finish_reason if u.done else None}


def stream(batches, include_usage, logprobs=False):
    """Two choices; each batch of (choice, event) arrives once the stream has read the last."""
    async def run():
        handle = Handle(asyncio.get_running_loop())
        for i in range(2):
            seq = Seq([1, 2, 3], SeqOptions(GREEDY, 4), i, handle.sink(i))
            handle.choices.append(Choice(i, seq, detokenize, []))

        async def produce():
            for batch in batches:
                for i, ev in batch:
                    if ev[0] == "token" and logprobs:
                        ev = (ev[0], ev[1], (-0.5, []))
                    handle.choices[i].seq.sink(ev)
                await asyncio.sleep(0.05)

        opening = [{"index": c.index, "text": "", "logprobs": None, "finish_reason": None}
                   for c in handle.choices]
        producer = asyncio.create_task(produce())
        lines = [line async for line in event_stream(handle, head, entry, opening=opening,
                                                      prompt_tokens=3, include_usage=include_usage)]
        await producer
        return lines
    lines = asyncio.run(run())
    assert all(line.startswith("data: ") and line.endswith("\n\n") for line in lines)
    assert lines[-1] == "data: [DONE]\n\n"
    return [json.loads(line[6:]) for line in lines[:-1]]


EVENTS = [(0, ("token", 0, None)), (1, ("prompt_logprobs", [None, None, None])),
          (0, ("token", 1, None)), (1, ("token", 2, None)), (0, ("done", "length")),
          (1, ("done", "eod"))]
USAGE = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


@pytest.mark.parametrize("include_usage", [False, True])
def test_chunks_in_order_with_the_usage(include_usage):
    chunks = stream([EVENTS], include_usage)
    assert [c["choices"] for c in chunks[:2]] == [
        [{"index": 0, "text": "", "logprobs": None, "finish_reason": None}],
        [{"index": 1, "text": "", "logprobs": None, "finish_reason": None}]]
    body = chunks[2:-1] if include_usage else chunks[2:]
    assert [c["choices"] for c in body] == [  # one update: merged per choice
        [{"index": 0, "text": "ab", "logprobs": None, "finish_reason": "length"}],
        [{"index": 1, "text": "c", "logprobs": None, "finish_reason": "stop"}]]
    if include_usage:
        assert chunks[-1] == {"object": "text_completion", "choices": [], "usage": USAGE}
        assert not any("usage" in c for c in chunks[:-1])
    else:
        assert body[-1]["usage"] == USAGE and not any("usage" in c for c in chunks[:-1])


def test_an_update_with_nothing_to_say_is_skipped():
    """Choice 1's first update holds only prompt scores: no chunk for it."""
    for logprobs in (False, True):
        chunks = stream([EVENTS[:2], EVENTS[2:]], False, logprobs)
        lp = [-0.5] if logprobs else None
        assert [c["choices"] for c in chunks[2:]] == [
            [{"index": 0, "text": "a", "logprobs": lp, "finish_reason": None}],
            [{"index": 0, "text": "b", "logprobs": lp, "finish_reason": "length"}],
            [{"index": 1, "text": "c", "logprobs": lp, "finish_reason": "stop"}]]
        assert chunks[-1]["usage"] == USAGE
