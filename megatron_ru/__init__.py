"""megatron_ru: pretrain and sample ruGPT-3 and T-lite style models with Megatron tensor parallelism
and DeepSpeed, on a laptop CPU or a GPU cluster."""
from .config import PRESETS, ConfigError, ModelConfig
from .model.gpt import GPTModel
from .parallel.state import ParallelState

__all__ = ["ModelConfig", "GPTModel", "ParallelState", "ConfigError", "PRESETS"]
__version__ = "0.1.0"
