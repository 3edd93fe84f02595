"""Serve a checkpoint over an OpenAI-compatible HTTP API: `python tools/serve.py --load DIR [--port 8000]`.

Model flags as generate.py's (--lora DIR, --quantize int8, tokenizer flags); the work lives in
megatron_ru/serving/server.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ru import runtime  # noqa: E402
from megatron_ru.serving.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(runtime.run(main, "tools/serve.py"))
