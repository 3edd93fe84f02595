"""Weighted blending: exact proportions over every window, sample provenance, --data-path errors."""
import numpy as np
import pytest

from megatron_ru.data.blended import BlendedDataset, blend_sample_counts, build_blend_indices, parse_data_path
from megatron_ru.data.builder import build_train_valid_test_datasets
from megatron_ru.data.indexed_dataset import IndexedDatasetBuilder
from megatron_ru.data.order import DatasetConfigError


def _write_dataset(prefix, num_docs, first_id, seed):
    rng = np.random.default_rng(seed)
    with IndexedDatasetBuilder(str(prefix), np.int32) as builder:
        start = first_id
        for n in rng.integers(5, 60, size=num_docs):
            builder.add_document(np.arange(start, start + n))
            start += n
    return str(prefix)


@pytest.mark.parametrize("weights", [[0.85, 0.15], [0.5, 0.3, 0.2], [0.7, 0.2, 0.05, 0.05], [1.0]])
def test_blend_proportions_hold_on_every_window(weights):
    size = 20_000
    dataset_index, sample_index = build_blend_indices(weights, size)
    num = len(weights)
    assert dataset_index.shape == (size,)
    for d, w in enumerate(weights):
        hits = dataset_index == d
        prefix_counts = np.concatenate([[0], np.cumsum(hits)])
        n = np.arange(size + 1)
        assert np.abs(prefix_counts - w * n).max() <= (num + 1) / 2  # every prefix
        for window in (10, 100, 1000):  # every window = difference of two prefixes
            counts = prefix_counts[window:] - prefix_counts[:-window]
            assert np.abs(counts - w * window).max() <= num + 1
        # each dataset is read in order 0, 1, 2, ... with no gaps or repeats
        np.testing.assert_array_equal(sample_index[hits], np.arange(hits.sum()))
        assert hits.sum() <= blend_sample_counts(weights, size)[d]


def test_blend_is_deterministic_and_unnormalised_weights_work():
    a = build_blend_indices([85, 15], 1000)
    b = build_blend_indices([0.85, 0.15], 1000)
    np.testing.assert_array_equal(a[0], b[0])
    assert (a[0] == 1).sum() == 150


def test_blended_datasets_end_to_end(tmp_path):
    ru = _write_dataset(tmp_path / "ru", 80, first_id=0, seed=0)
    en = _write_dataset(tmp_path / "en", 80, first_id=1_000_000, seed=1)
    train, valid, _ = build_train_valid_test_datasets(
        ["0.85", ru, "0.15", en], "90,10,0", seq_length=16, seed=7, num_samples=(400, 40, 0),
        cache_path=str(tmp_path / "cache"))
    assert isinstance(train, BlendedDataset) and len(train) == 400 and len(valid) == 40
    origin = []
    for i in range(len(train)):
        sample = train[i]
        assert sample["text"].shape == (17,)
        from_en = sample["text"] >= 1_000_000
        assert from_en.all() or not from_en.any()  # a sample never mixes sources
        assert bool(from_en.all()) == (sample["dataset_id"] == 1)
        origin.append(int(sample["dataset_id"]))
    assert origin.count(1) == 60 and origin.count(0) == 340  # 15 % of 400, exactly


def test_parse_data_path(tmp_path):
    ru = _write_dataset(tmp_path / "ru", 3, 0, 0)
    en = _write_dataset(tmp_path / "en", 3, 0, 1)
    assert parse_data_path([ru]) == [(1.0, ru)]
    assert parse_data_path(f"3 {ru} 1 {en}") == [(0.75, ru), (0.25, en)]
    assert parse_data_path(["0", ru, "2", en]) == [(1.0, en)]  # zero weight drops a source
    with pytest.raises(DatasetConfigError, match="sum to a positive number"):
        parse_data_path(["0", ru, "0", en])
    with pytest.raises(DatasetConfigError, match="non-negative"):
        parse_data_path(["-1", ru, "2", en])
    with pytest.raises(DatasetConfigError, match="'WEIGHT PREFIX' pairs"):
        parse_data_path(["0.5", ru, "0.5"])
    with pytest.raises(DatasetConfigError, match="weight 'heavy'"):
        parse_data_path(["heavy", ru, "1", en])
    with pytest.raises(DatasetConfigError, match=r"--data-path prefix '.*missing' does not exist"):
        parse_data_path(["0.5", ru, "0.5", str(tmp_path / "missing")])
    with pytest.raises(DatasetConfigError, match="--data-path is empty"):
        parse_data_path([])
