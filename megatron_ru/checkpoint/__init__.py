"""megatron_ru.checkpoint: our format (model_io) at the base, foreign readers/writers on it, `load` opens any checkpoint, `convert` converts, `training` saves and resumes DeepSpeed runs."""
