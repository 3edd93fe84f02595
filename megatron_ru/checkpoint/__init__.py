"""megatron_ru.checkpoint (grows with its issue)."""
