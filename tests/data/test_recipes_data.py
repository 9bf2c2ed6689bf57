"""The dataset recipes without a model: repeats and source mixing in the order, tag processing, masks that follow
their image, the element losses, the masked and the prior-preservation loss (docs/recipes.md)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from difftrain.errors import UserError


# ---- the order: repeats and class-image pairing -------------------------------------------------------
def test_repeats_are_counted_exactly_over_every_epoch():
    from difftrain.data.order import BatchOrder, Mixing

    n = 10  # positions 0-3 repeat twice, 4-9 half of them per epoch (3 of 6, a new draw each epoch)
    mixing = Mixing(n, [2.0] * 4 + [0.5] * 6, [None] * n)
    order = BatchOrder([list(range(n))], batch_size=1, grad_accum=1, world_size=1, seed=3, mixing=mixing)
    assert order.micro_per_epoch == 4 * 2 + 3
    halves = []
    for epoch in range(4):
        slots = [int(b[0]) for b in order.epoch_batches(epoch)]
        assert sorted(s for s in slots if s % n < 4) == sorted([p for p in range(4)] + [p + n for p in range(4)])
        half = sorted(s % n for s in slots if s % n >= 4)
        assert len(half) == 3 and len(set(half)) == 3
        halves.append(tuple(half))
    assert len(set(halves)) > 1  # another half each epoch
    plain = BatchOrder([list(range(n))], 1, 1, 1, seed=3)
    ones = BatchOrder([list(range(n))], 1, 1, 1, seed=3, mixing=Mixing(n, [1.0] * n, [None] * n))
    assert [b.tolist() for b in plain.epoch_batches(2)] == [b.tolist() for b in ones.epoch_batches(2)]


def test_class_images_are_paired_with_the_samples_of_their_source():
    from difftrain.data.order import BatchOrder, Mixing

    n = 9  # instance positions 0-5 (0-2 from a source with a prior: pool 0 = positions 6-8)
    mixing = Mixing(n, [1.0] * n, [0, 0, 0, None, None, None, None, None, None], [[6, 7, 8]])
    order = BatchOrder([list(range(6))], batch_size=3, grad_accum=1, world_size=1, seed=0, mixing=mixing)
    seen = Counter()
    for step in range(order.micro_per_epoch):
        epoch, slots, j = order.locate(step, 0, 0)
        paired = order.class_positions(epoch, j, slots)
        assert len(paired) == sum(1 for s in slots.tolist() if s < 3) and set(paired) <= {6, 7, 8}
        seen.update(paired)
    assert sum(seen.values()) == 3  # one class image per sample of the prior source, each of the epoch


# ---- captions ------------------------------------------------------------------------------------
def test_tag_shuffling_keeps_the_kept_tags_and_replays_per_sample_and_epoch():
    from difftrain.components.seeding import seed_for
    from difftrain.data.caption_rules import CaptionRules

    rules = CaptionRules(prefix="sks", shuffle_tags=True, keep_tags=1, tag_dropout=0.25)
    caption = rules.fixed("a dog, beach, sunset, red collar, grass, blue sky")
    assert caption == "sks, a dog, beach, sunset, red collar, grass, blue sky"

    def drawn(epoch, position):
        return rules.draw(caption, torch.Generator().manual_seed(seed_for(0, 0, f"sample/{epoch}/{position}")))

    outs = [drawn(e, 3) for e in range(12)]
    assert all(o.startswith("sks, a dog") for o in outs)  # the trigger word and the kept tag stay first
    assert outs == [drawn(e, 3) for e in range(12)]         # the same draws after a resume
    assert len(set(outs)) > 6                               # and new ones every epoch
    tags = Counter(t for o in outs for t in o.split(", ")[2:])
    assert set(tags) <= {"beach", "sunset", "red collar", "grass", "blue sky"}
    kept = sum(tags.values()) / (12 * 5)
    assert 0.5 < kept < 0.95  # tag_dropout 0.25: about three in four stay


# ---- losses --------------------------------------------------------------------------------------
class _Schedule:
    num_train_timesteps = 1000

    def snr(self, indices):
        return torch.exp(-indices.float() / 100)  # any decreasing SNR


def test_huber_tends_to_mse_and_to_scaled_l1():
    from difftrain.components.losses import ElementLoss

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    mse = ElementLoss("mse")(pred, target, _Schedule(), t)
    assert torch.equal(mse, (pred - target) ** 2)
    assert torch.equal(ElementLoss("l1")(pred, target, _Schedule(), t), (pred - target).abs())
    for delta, tol in ((1e3, 1e-5), (1e6, 1e-6)):  # error ~ r^2 / (4 delta^2), then float32 rounding
        huber = ElementLoss("huber", delta=delta)(pred, target, _Schedule(), t)
        assert (huber - mse).abs().max() / mse.max() < tol  # -> mse as delta -> infinity
    small = ElementLoss("huber", delta=1e-6)(pred, target, _Schedule(), t)
    assert torch.allclose(small, 2e-6 * (pred - target).abs(), rtol=1e-4)  # -> 2 delta |r|


def test_huber_schedules_match_their_formulas():
    from difftrain.components.losses import ElementLoss

    t = torch.tensor([0, 333, 999])
    exponential = ElementLoss("huber", delta=0.1, schedule="exponential").threshold(_Schedule(), t)
    assert torch.allclose(exponential, torch.tensor([1.0, 0.1 ** (333 / 999), 0.1]))
    snr = ElementLoss("huber", delta=0.1, schedule="snr").threshold(_Schedule(), t)
    sigma = torch.exp(-t.float() / 100).rsqrt()
    assert torch.allclose(snr, 0.9 / (1 + sigma) ** 2 + 0.1)
    assert float(snr[0]) == pytest.approx(0.1 + 0.9 / 4)  # SNR 1: sigma 1


class _PixelFamily:
    """A 'denoiser' that predicts one learnable tensor: the gradient of the loss is d loss / d prediction."""

    def predict(self, model, x_t, timesteps, cond):
        return model.expand_as(x_t)


def _objective(**kw):
    from difftrain.components.noise_schedules import build_schedule
    from difftrain.components.weighting import build_density, build_loss_weighting
    from difftrain.config import schema
    from difftrain.engine.objective import DiffusionObjective

    return DiffusionObjective(build_schedule(schema.DDPMSchedulerConfig()), build_density(schema.UniformDensityConfig()),
                              build_loss_weighting(schema.NoWeightingConfig()), **kw)


def test_masked_loss_is_blind_where_the_mask_is_zero_and_plain_with_ones():
    from difftrain.components.losses import ElementLoss
    from difftrain.engine.objective import loss_extras

    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    masks = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    masks[:, :, :, :4] = 0  # the left half ignored
    for element in (None, ElementLoss("huber", delta=0.5)):
        objective = _objective(element_loss=element)
        draw = objective.draw(x0, torch.Generator().manual_seed(2))
        param = torch.nn.Parameter(torch.randn(2, 3, 8, 8))
        extras = loss_extras({"masks": masks, "mask_floor": torch.zeros(2)})
        loss = objective.loss(_PixelFamily(), param, x0, {}, draw, extras)
        loss.backward()
        assert torch.count_nonzero(param.grad[..., :4]) == 0 and torch.count_nonzero(param.grad[..., 4:]) == 2 * 3 * 8 * 4
        ones = loss_extras({"masks": torch.full_like(masks, 255), "mask_floor": torch.zeros(2)})
        assert torch.equal(objective.loss(_PixelFamily(), param, x0, {}, draw, ones),
                           objective.loss(_PixelFamily(), param, x0, {}, draw))
    half = loss_extras({"masks": masks, "mask_floor": torch.full((2,), 0.25)})["mask"]
    assert torch.equal(half[0, 0, 0], torch.tensor([0.25] * 4 + [1.0] * 4))  # unmasked_weight outside the mask


def test_prior_loss_is_instance_plus_weighted_class_mean():
    objective = _objective()
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    draw = objective.draw(x0, torch.Generator().manual_seed(4))
    param = torch.randn(4, 3, 8, 8)
    prediction, target = objective.prediction_and_target(_PixelFamily(), param, x0, {}, draw)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    extras = {"prior": torch.tensor([False, False, True, True]), "prior_weight": torch.tensor([1.0, 1.0, 0.5, 0.5])}
    loss, terms = objective.loss_terms(_PixelFamily(), param, x0, {}, draw, extras)
    assert torch.allclose(loss, per_sample[:2].mean() + 0.5 * per_sample[2:].mean(), rtol=1e-6)
    assert torch.allclose(terms["loss_instance"], per_sample[:2].mean())
    assert torch.allclose(terms["loss_prior"], per_sample[2:].mean())


# ---- sources, masks and captions through the data layer ------------------------------------------
def _folder(root: Path, n: int, size=(40, 48), masks: bool = False, prefix: str = "img") -> Path:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(root)))
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{prefix}{i}.png")
        if masks:  # the mask is the red channel: after any transform, mask == red channel (nearest filter)
            Image.fromarray(pixels[..., 0]).save(root / f"{prefix}{i}_mask.png")
        rows.append({"file_name": f"{prefix}{i}.png", "text": f"tag{i}, red, blue, green"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _sources_data(tmp_path, entries, **top):
    from torchvision.transforms import InterpolationMode

    from difftrain.config.schema import SourcesDataConfig
    from difftrain.data.multi import build_sources

    options = SourcesDataConfig(resolution=32, sources=entries, **top)
    return build_sources(options, InterpolationMode.BILINEAR, seed=0, size_multiple=8, cache_folder=tmp_path / "cache")


def test_two_sources_mix_with_their_repeats_and_captions(tmp_path):
    a, b = _folder(tmp_path / "a", 4), _folder(tmp_path / "b", 6, size=(48, 40))
    data = _sources_data(tmp_path, [{"path": str(a), "repeats": 2, "caption_prefix": "sks"},
                                    {"name": "style", "path": str(b), "repeats": 0.5, "shuffle_tags": True,
                                     "keep_tags": 1}], buckets="auto")
    assert data.source_names == ["a", "style"] and data.random_captions
    assert data.names[:4] == [f"a/img{i}.png" for i in range(4)] and data.captions[0] == "sks, tag0, red, blue, green"
    order = data.order(batch_size=1, grad_accum=1, world_size=1, seed=0)
    assert order.micro_per_epoch == 4 * 2 + 3
    from difftrain.engine.loss_terms import LossTerms

    terms = LossTerms(data, order, world_size=1, grad_accum=1)
    assert terms.metrics(order.micro_per_epoch, 0) == {"samples_seen/a": 8, "samples_seen/style": 3}
    from difftrain.data.samples import MicroBatchKey

    epoch, slots, _ = order.locate(0, 0, 0)
    batch = data.samples.__getitems__(MicroBatchKey(0, 0, epoch, tuple(slots.tolist())))
    assert batch["pixels"].shape[-2:] == tuple(data.plan.buckets[data.plan.bucket_of[int(slots[0]) % 10]])
    again = data.samples.__getitems__(MicroBatchKey(0, 0, epoch, tuple(slots.tolist())))
    assert batch["captions"] == again["captions"]


def test_masks_follow_their_image_through_crop_and_flip(tmp_path):
    from torchvision.transforms import InterpolationMode

    from difftrain.config.schema import ImageFolderDataConfig
    from difftrain.data.samples import MicroBatchKey, unit_range
    from difftrain.data.sources import build_imagefolder

    folder = _folder(tmp_path / "m", 4, size=(40, 48), masks=True)
    options = ImageFolderDataConfig(path=str(folder), resolution=32, center_crop=False, random_flip=True, masks="files",
                                    unmasked_weight=0.1)
    data = build_imagefolder(options, InterpolationMode.NEAREST, seed=0, size_multiple=8)
    assert len(data.index) == 4  # the _mask files are not training images
    for epoch in range(3):
        batch = data.samples.__getitems__(MicroBatchKey(0, 0, epoch, (0, 1, 2, 3)))
        red = ((unit_range(batch["pixels"])[:, :1] + 1) * 127.5).round().to(torch.uint8)
        assert torch.equal(batch["masks"], red)
        assert torch.equal(batch["mask_floor"], torch.full((4,), 0.1))
    from PIL import Image

    Image.new("L", (10, 10)).save(folder / "img2_mask.png")
    with pytest.raises(UserError, match=r"img2.png \(its mask img2_mask.png is 10x10 but the image is 40x48"):
        build_imagefolder(options, InterpolationMode.NEAREST, seed=0, size_multiple=8)
