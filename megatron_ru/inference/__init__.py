"""megatron_ru.inference (grows with its issue)."""
