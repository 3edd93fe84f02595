"""--seq-length follows the model: the preset's / flags' / checkpoint's max_position_embeddings."""
import pytest

from megatron_ru.config import ConfigError
from megatron_ru.training.arguments import model_config, parse_pretrain_args


def _args(*extra):
    return parse_pretrain_args(["--data-path", "x", *extra])


def test_preset_alone_gets_its_max_position_embeddings():
    args = _args("--preset", "tiny-gpt3")
    assert args.seq_length is None
    said = []
    cfg = model_config(args, 1000, None, said.append)
    assert cfg.max_position_embeddings == 256 and args.seq_length == 256
    assert said == ["--seq-length 256 (the model's max_position_embeddings; give --seq-length to "
                    "train on shorter sequences)"]


def test_flags_and_explicit_values():
    args = _args("--preset", "tiny-gpt3", "--max-position-embeddings", "512")
    model_config(args, 1000, None)
    assert args.seq_length == 512
    args = _args("--preset", "tiny-gpt3", "--seq-length", "64")
    model_config(args, 1000, None)
    assert args.seq_length == 64
    args = _args("--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2")
    assert model_config(args, 1000, None).max_position_embeddings == 1024 and args.seq_length == 1024
    with pytest.raises(ConfigError, match="--seq-length=512 is longer than the model's "
                                          "max_position_embeddings=256"):
        model_config(_args("--preset", "tiny-gpt3", "--seq-length", "512"), 1000, None)


def test_sequence_parallel_checks():
    """--sequence-parallel: a note at TP 1; one line for a sequence TP does not divide (exit 2:
    ConfigError is a UsageError); pipeline stages are fine."""
    said = []
    cfg = model_config(_args("--preset", "tiny-gpt3", "--seq-length", "63", "--sequence-parallel"),
                       1000, None, said.append)
    assert cfg.sequence_parallel and said == ["--sequence-parallel has no effect at "
                                              "--tensor-model-parallel-size 1 (nothing to split the "
                                              "sequence over)"]
    assert model_config(_args("--preset", "tiny-gpt3", "--seq-length", "64", "--sequence-parallel",
                              "--tensor-model-parallel-size", "4"), 1000, None).sequence_parallel
    assert not model_config(_args("--preset", "tiny-gpt3"), 1000, None).sequence_parallel
    with pytest.raises(ConfigError, match=r"^--sequence-parallel: --seq-length 63 is not divisible by "
                                          r"--tensor-model-parallel-size 2 \("):
        model_config(_args("--preset", "tiny-gpt3", "--seq-length", "63", "--sequence-parallel",
                           "--tensor-model-parallel-size", "2"), 1000, None)
    assert model_config(_args("--preset", "tiny-gpt3", "--seq-length", "64", "--sequence-parallel",
                              "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
                              "2"), 1000, None).sequence_parallel
    # with context parallelism each CP slice (S / CP tokens) is split over TP
    assert model_config(_args("--preset", "tiny-gpt3", "--seq-length", "64", "--sequence-parallel",
                              "--tensor-model-parallel-size", "2", "--context-parallel-size", "2"),
                        1000, None).sequence_parallel
    with pytest.raises(ConfigError, match=r"^--sequence-parallel: --seq-length 36 is not divisible by "
                                          r"--tensor-model-parallel-size x --context-parallel-size "
                                          r"= 4 x 2 \("):
        model_config(_args("--preset", "tiny-gpt3", "--seq-length", "36", "--sequence-parallel",
                           "--tensor-model-parallel-size", "4", "--context-parallel-size", "2"),
                     1000, None)
