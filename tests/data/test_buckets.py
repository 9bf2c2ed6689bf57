"""Buckets, crops and the replayable order, checked with numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from difftrain.data.buckets import auto_buckets, center_offset, cover, nearest_bucket, plan_buckets
from difftrain.data.order import BatchOrder, holdout
from difftrain.errors import UserError


def test_auto_ladder_at_64_with_step_16():
    # area 64^2 = 4096: for width w the height is floor(4096 / w) rounded down to 16, kept within 1:4..4:1,
    # and every size also transposed
    assert auto_buckets(64, 16) == [(128, 32), (112, 32), (96, 32), (80, 48), (64, 64), (48, 80), (32, 96),
                                    (32, 112), (32, 128)]
    ladder = auto_buckets(1024, 64)  # SDXL-sized: all sides multiples of 64, area at most 1024^2
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024 ** 2 for h, w in ladder)
    assert (1024, 1024) in ladder and (832, 1216) in ladder and (1216, 832) in ladder


@pytest.mark.parametrize(("size", "bucket", "resized", "offset"), [
    ((300, 200), (80, 48), (80, 53), (0, 2)),     # aspect 0.67 -> 0.6; scale max(80/300, 48/200) = 0.267
    ((100, 400), (32, 128), (32, 128), (0, 0)),   # aspect 4 -> exactly 4:1; scale 0.32
    ((50, 40), (64, 64), (80, 64), (8, 0)),       # aspect 0.8: 1:1 (log distance 0.22) beats 0.6 (0.29); x1.6
])
def test_bucket_resize_and_center_crop_by_hand(size, bucket, resized, offset):
    buckets = auto_buckets(64, 16)
    assert buckets[nearest_bucket(size, buckets)] == bucket
    got, _ = cover(size, bucket)
    assert got == resized and center_offset(got, bucket) == offset


def test_too_small_images():
    plan = plan_buckets([(20, 20), (32, 32), (64, 16)], "auto", 64, 16, max_upscale=2.0)
    assert plan.too_small == [0]  # 20 -> 64 is x3.2; 32 -> 64 is x2.0 (allowed); 64x16 -> 128x32 is x2.0
    assert plan.buckets[plan.bucket_of[2]] == (128, 32)
    assert plan_buckets([(32, 32)], "none", 64, 16, max_upscale=1.5).too_small == [0]


def test_order_is_one_bucket_per_micro_batch_and_a_pure_function_of_seed_and_epoch():
    groups = [list(range(0, 10)), list(range(10, 13)), list(range(13, 20))]
    order = BatchOrder(groups, batch_size=3, grad_accum=2, world_size=2, seed=7)
    assert order.micro_per_epoch == (3 + 1 + 2) // 2  # full batches per bucket: 3, 1, 2; per rank 3
    seen = []
    for step in range(3):  # one epoch: 3 micro-batches per rank = 1.5 steps of 2 -> steps 0, 1 and half of 2
        for micro in range(2):
            for rank in range(2):
                epoch, idx = order.indices(step, micro, rank)
                if epoch == 0:
                    assert len({g for g, members in enumerate(groups) for i in idx.tolist() if i in members}) == 1
                    seen += idx.tolist()
    assert len(seen) == len(set(seen)) == 18  # 6 batches of 3, no sample twice in an epoch
    again = BatchOrder(groups, 3, 2, 2, seed=7)
    assert [again.indices(5, 1, r)[1].tolist() for r in (0, 1)] == [order.indices(5, 1, r)[1].tolist() for r in (0, 1)]
    assert [b.tolist() for b in order.epoch_batches(0)] != [b.tolist() for b in BatchOrder(groups, 3, 2, 2, 8).epoch_batches(0)]
    assert [b.tolist() for b in order.epoch_batches(0)] != [b.tolist() for b in order.epoch_batches(1)]


def test_buckets_smaller_than_a_batch_give_no_batch():
    order = BatchOrder([[0, 1, 2, 3], [4], [5]], batch_size=2, grad_accum=1, world_size=1, seed=0)
    assert order.micro_per_epoch == 2 and all(len(b) == 2 for b in order.epoch_batches(0))


def test_one_bucket_is_a_plain_permutation_cut_into_batches():
    from difftrain.components.seeding import seed_for

    order = BatchOrder([list(range(20))], batch_size=4, grad_accum=1, world_size=2, seed=3)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(seed_for(3, 0, "data") + 1))
    # epoch 1 starts at step 2 (2 micro-batches per rank per epoch); rank r of position p gets batch 2p + r
    assert order.indices(3, 0, 1)[1].tolist() == perm[(1 * 2 + 1) * 4:(1 * 2 + 2) * 4].tolist()


def test_holdout_is_drawn_once_from_the_seed():
    assert holdout(100, 0.1, 0) == holdout(100, 10, 0) and len(holdout(100, 0.1, 0)) == 10
    assert holdout(100, 0.1, 0) != holdout(100, 0.1, 1) and holdout(100, 0, 0) == []
    with pytest.raises(UserError, match="leaving none to train on"):
        holdout(5, 5, 0)
