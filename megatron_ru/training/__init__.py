"""megatron_ru.training: the loop around the DeepSpeed engine (trainer), its CLI (arguments), run lifecycle, guards, fine-tuning and LoRA hooks, DeepSpeed config, optimizer groups, metrics."""
