"""ModelConfig: presets, parameter counts on the meta device, derived fields, validation errors."""
import pytest
import torch

from megatron_ru import ConfigError, GPTModel, ModelConfig, PRESETS


def meta_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        model = GPTModel(cfg)
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,billions", [("rugpt3-13b", 12.85), ("tlite-8b", 8.03)])
def test_big_presets_count_on_meta(name, billions):
    cfg = ModelConfig.from_preset(name)
    n = meta_count(cfg)
    assert round(n / 1e9, 2) == billions
    assert n == cfg.num_parameters()


def test_published_shapes():
    c = ModelConfig.from_preset("rugpt3-13b")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.max_position_embeddings,
            c.vocab_size) == (40, 5120, 40, 2048, 50257)
    assert c.sparse_layers() == [i % 2 == 0 for i in range(40)]
    assert sum(c.sparse_layers()) == 20
    t = ModelConfig.from_preset("tlite-8b")
    assert (t.num_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads,
            t.ffn_hidden_size, t.vocab_size, t.rope_theta, t.max_position_embeddings,
            t.norm_eps, t.tie_word_embeddings, t.use_bias) == (
        32, 4096, 32, 8, 14336, 128256, 500000.0, 8192, 1e-5, False, False)
    for name, shape in [("rugpt3-small", (12, 768, 12)), ("rugpt3-medium", (24, 1024, 16)),
                        ("rugpt3-large", (24, 1536, 16)), ("rugpt3-xl", (24, 2048, 16))]:
        c = ModelConfig.from_preset(name)
        assert (c.num_layers, c.hidden_size, c.num_attention_heads) == shape
        assert c.ffn_hidden_size == 4 * c.hidden_size and c.tie_word_embeddings


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_counts_analytically(name):
    cfg = ModelConfig.from_preset(name)
    assert meta_count(cfg) == cfg.num_parameters()


def test_vocab_padding_rule():
    c = ModelConfig.from_preset("rugpt3-13b")
    assert c.padded_vocab_size(1) == 50304
    assert c.padded_vocab_size(2) == 50432
    assert c.padded_vocab_size(4) == 50688
    assert ModelConfig.from_preset("tlite-8b").padded_vocab_size(1) == 128256
    assert ModelConfig.from_preset("tlite-8b").padded_vocab_size(8) == 129024


def test_overrides_and_round_trip():
    c = ModelConfig.from_preset("tiny-llama", num_layers=3, hidden_dropout=0.1)
    assert c.num_layers == 3 and c.hidden_dropout == 0.1 and c.family == "llama"
    assert ModelConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("kwargs,words", [
    (dict(hidden_size=100, num_attention_heads=3), ["hidden_size=100", "num_attention_heads=3"]),
    (dict(num_attention_heads=4, num_key_value_heads=3), ["num_key_value_heads=3"]),
    (dict(family="bert"), ["family='bert'"]),
    (dict(num_layers=0), ["num_layers=0"]),
    (dict(hidden_dropout=1.5), ["hidden_dropout=1.5"]),
    (dict(sparse_mode="every_third"), ["sparse_mode='every_third'"]),
])
def test_invalid_config_names_value_and_rule(kwargs, words):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'.*rugpt3-13b"):
        ModelConfig.from_preset("gpt5")


@pytest.mark.parametrize("tp,field", [(3, "num_attention_heads"), (4, "num_key_value_heads")])
def test_tp_divisibility(tp, field):
    cfg = ModelConfig.from_preset("tiny-llama", num_attention_heads=4, num_key_value_heads=2,
                                  ffn_hidden_size=192)
    with pytest.raises(ConfigError, match=f"{field}=.* not divisible by tensor_model_parallel_size={tp}"):
        cfg.validate_parallel(tp)


def test_sparse_modes():
    sparse = {"mode": "fixed", "block": 16}
    assert ModelConfig(num_layers=4, sparse_attention=sparse, sparse_mode="all").sparse_layers() == [True] * 4
    assert ModelConfig(num_layers=4, sparse_attention=sparse, sparse_mode="top_bottom").sparse_layers() == [True, True, False, False]
    assert ModelConfig(num_layers=4).sparse_layers() == [False] * 4
    assert ModelConfig(num_layers=4, sparse_attention=sparse, sparse_mode="dense").sparse_layers() == [False] * 4
    assert not any(ModelConfig.from_preset("rugpt3-13b", sparse_mode="dense").sparse_layers())
