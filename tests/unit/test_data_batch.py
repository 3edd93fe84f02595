"""Sampler resume and disjoint data-parallel shards; tokens/labels/masks/positions from samples."""
import numpy as np
import pytest
import torch

from megatron_ru.data.batch import DataParallelSampler, build_data_loader, get_batch
from megatron_ru.data.builder import build_train_valid_test_datasets
from megatron_ru.data.indexed_dataset import IndexedDatasetBuilder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(str(root / "d"), np.int32) as builder:
        for _ in range(200):
            builder.add_document(rng.integers(1, 1000, size=rng.integers(3, 50)))
    train, _, _ = build_train_valid_test_datasets([str(root / "d")], "100,0,0", 12, 3, (300, 0, 0),
                                                  cache_path=str(root / "cache"))
    return train


def test_shards_are_disjoint_and_cover_everything():
    total, mbs, dp = 103, 4, 3
    shards = [[i for b in DataParallelSampler(total, 5, mbs, r, dp) for i in b] for r in range(dp)]
    flat = sorted(i for s in shards for i in s)
    assert len(flat) == len(set(flat))  # disjoint
    full_steps = (total - 5) // (mbs * dp)
    assert flat == list(range(5, 5 + full_steps * mbs * dp))  # drop_last: only whole global batches
    assert [len(DataParallelSampler(total, 5, mbs, r, dp)) for r in range(dp)] == [full_steps] * dp
    keep = [[i for b in DataParallelSampler(total, 5, mbs, r, dp, drop_last=False) for i in b] for r in range(dp)]
    assert sorted(i for s in keep for i in s) == list(range(5, total))
    assert [len(DataParallelSampler(total, 5, mbs, r, dp, drop_last=False)) for r in range(dp)] == [
        len(list(DataParallelSampler(total, 5, mbs, r, dp, drop_last=False))) for r in range(dp)]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank 2 is outside"):
        DataParallelSampler(10, 0, 1, 2, 2)
    with pytest.raises(ValueError, match="consumed_samples 11"):
        DataParallelSampler(10, 11, 1, 0, 1)
    with pytest.raises(ValueError, match="micro-batch-size"):
        DataParallelSampler(10, 0, 0, 0, 1)


def test_resume_gives_the_same_next_batches(dataset):
    mbs, dp = 2, 2
    for rank in range(dp):
        full = list(build_data_loader(dataset, consumed_samples=0, micro_batch_size=mbs, dp_rank=rank, dp_size=dp))
        consumed = 7 * mbs * dp  # as if a checkpoint was taken after 7 steps
        resumed = build_data_loader(dataset, consumed_samples=consumed, micro_batch_size=mbs, dp_rank=rank,
                                    dp_size=dp)
        for step, batch in enumerate(resumed):
            assert batch["text"].shape == (mbs, 13) and batch["text"].dtype == torch.int64
            assert torch.equal(batch["text"], full[7 + step]["text"])
        assert step == len(full) - 8


def _reference_masks(data, eod):
    """Megatron's loop-based get_ltor_masks_and_position_ids, all flags on."""
    b, s = data.shape
    att = torch.tril(torch.ones(b, s, s)).view(b, 1, s, s)
    loss = torch.ones(b, s)
    loss[data == eod] = 0.0
    pos = torch.arange(s).unsqueeze(0).repeat(b, 1)
    for i in range(b):
        eods = pos[i, data[i] == eod].tolist()
        prev = 0
        for j in eods:
            att[i, 0, j + 1:, :j + 1] = 0
            pos[i, j + 1:] -= j + 1 - prev
            prev = j + 1
    return att < 0.5, loss, pos


def test_get_batch_matches_megatron_reference():
    eod = 0
    text = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 0, 3, 4],
                         [1, 2, 3, 4, 5, 6, 7, 8, 9, 1],
                         [0, 1, 0, 2, 0, 3, 0, 4, 0, 5]])
    out = get_batch(text, eod, eod_mask_loss=True, reset_position_ids=True, reset_attention_mask=True)
    att, loss, pos = _reference_masks(text[:, :-1], eod)
    assert torch.equal(out["tokens"], text[:, :-1]) and torch.equal(out["labels"], text[:, 1:])
    assert torch.equal(out["attention_mask"], att) and out["attention_mask"].shape == (3, 1, 9, 9)
    assert torch.equal(out["loss_mask"], loss)
    assert torch.equal(out["position_ids"], pos)
    assert out["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 0]
    plain = get_batch(text, eod)
    assert plain["attention_mask"] is None and plain["loss_mask"].sum() == 27
    assert torch.equal(plain["position_ids"], torch.arange(9).expand(3, 9))
