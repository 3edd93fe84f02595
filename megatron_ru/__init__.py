"""megatron_ru: pretrain and sample ruGPT-3 and T-lite style models with Megatron tensor parallelism
and DeepSpeed, on a laptop CPU or a GPU cluster."""
__version__ = "0.1.0"
__all__ = ["ModelConfig", "GPTModel", "ParallelState", "ConfigError", "PRESETS"]

_LAZY = {"ModelConfig": ".config", "ConfigError": ".config", "PRESETS": ".config",
         "GPTModel": ".model.gpt", "ParallelState": ".parallel.state"}


def __getattr__(name):
    # Lazy: `import megatron_ru.data` (tools/preprocess_data.py) must not pay for importing torch.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'megatron_ru' has no attribute {name!r}")
