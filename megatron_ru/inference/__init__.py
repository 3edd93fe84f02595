"""megatron_ru.inference: sampling from GPTModel — pure sampling functions, a KV-cache Generator
with batching and tensor-parallel token broadcast, and generate.py's command line."""
from .generator import Completion, Generator, PromptError
from .quantize import QuantizeError, QuantSpec, quantize
from .sampling import GREEDY, SamplingError, SamplingParams

__all__ = ["Generator", "Completion", "PromptError", "SamplingParams", "SamplingError", "GREEDY",
           "quantize", "QuantSpec", "QuantizeError"]
