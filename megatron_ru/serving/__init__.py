"""megatron_ru.serving: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra) with
continuous batching over a static KV cache and tensor-parallel step plans; see tools/serve.py."""
