"""Serve a checkpoint over an OpenAI-compatible HTTP API: `python tools/serve.py --load DIR [--port 8000]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ru import runtime  # noqa: E402
from megatron_ru.serving.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(runtime.run(main, "tools/serve.py"))
