"""megatron_ru.training (grows with its issue)."""
