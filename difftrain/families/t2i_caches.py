"""The latent and prompt-embedding caches of the latent text-to-image families (data/cache.py stores them).

Latents: one entry per sample (every position of the index, held-out ones included) and, when the data flips,
one per mirror image: the VAE posterior parameters (mean and logvar) of the sample's one cached crop (data/
samples.py `cache_crop`: the center, or one random draw per sample, so random crops are drawn once when
latents are cached; flips still change per epoch).

Text: one entry per distinct caption and the empty prompt; each sample points at its caption's row, a dropped
caption at the empty prompt's.

Both are filled ahead (before step 1) or lazily (data.cache_fill): then the data serves what is cached and
hands the rest to the step, where `LatentFill` / `TextFill` encode it -- each entry alone, exactly as the ahead
fill does, so the bits do not depend on the way a cache was filled -- and give it to the cache's writer.
"""

from __future__ import annotations

import gc

import torch

from difftrain.data import cache as caches
from difftrain.data.samples import CacheItems, unit_range

BIG_TEXT_ENCODERS = 1 << 30  # cache_fill=auto fills the text cache ahead above this many bytes of encoder weights


def latent_fields(t2i, data, options, source: dict) -> dict:
    """Everything that changes the cached latents (the cache key)."""
    samples = data.samples
    random_crop = not samples.augment.center_crop
    return {**source, "what": "vae latent distributions", "vae": caches.module_fingerprint(t2i.vae),
            "vae_config": dict(t2i.vae.config), "images": data.fingerprint, "flips": bool(data.random_flip),
            "buckets": [list(b) for b in data.plan.buckets], "bucket_of": caches.digest(data.plan.bucket_of),
            "channels": data.channels, **dict(options.key_fields),
            "crop_seed": samples.seed if random_crop else None}


def encode_latent(vae, pixels: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """The (2C, h, w) posterior parameters of one (C, H, W) uint8 image, encoded alone, outside autocast."""
    with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
        x = unit_range(pixels[None]).to(device=device, dtype=dtype)
        return vae.encode(x).latent_dist.parameters[0].float().cpu()


def text_fill_mode(t2i, fill: str) -> str:
    """data.cache_fill for the prompt embeddings: auto = ahead when the frozen encoders are big (SDXL's two
    CLIPs, T5), so they are released before step 1, else lazily."""
    if fill != "auto":
        return fill
    size = sum(p.numel() * p.element_size() for e in t2i.frozen_encoders.values() for p in e.parameters())
    return "ahead" if size > BIG_TEXT_ENCODERS else "lazy"


class LatentFill:
    """The step's side of the latent cache: the batch's latents, the missing entries encoded and cached."""

    def __init__(self, t2i, data, options, source: dict) -> None:
        samples, self.t2i = data.samples, t2i
        self.flips = flips = bool(data.random_flip)
        served = samples.served
        served.flips = flips
        device, dtype = t2i.accelerator.device, t2i.vae_dtype

        def compute(entries: list[int]) -> dict[int, caches.Row]:
            wanted, out = set(entries), {}
            positions = sorted({e // 2 if flips else e for e in entries})
            loader = torch.utils.data.DataLoader(CacheItems(samples, positions), batch_size=None,
                                                 num_workers=options.num_workers)
            for position, pixels in loader:
                for flip in (False, True) if flips else (False,):
                    entry = served.latent_entry(position, flip)
                    if entry in wanted:
                        out[entry] = {"mean_logvar": encode_latent(t2i.vae, pixels.flip(-1) if flip else pixels,
                                                                   device, dtype)}
            return out

        count = len(data.index) * (2 if flips else 1)
        self.cache = caches.EntryCache(options.folder, "latents", latent_fields(t2i, data, options, source), count)
        fill = "ahead" if options.fill == "ahead" else "lazy"
        self.reader = served.latents = self.cache.open(t2i.accelerator, fill, compute, options.prune)
        self.writer = caches.EntryWriter(self.cache, self.reader)

    @property
    def folder(self):
        return self.cache.folder

    def params(self, batch: dict) -> torch.Tensor:
        """(B, 2C, h, w) on the CPU: the served rows, and the missing entries encoded (or found since)."""
        fill = batch.get("latent_fill")
        if fill is None:
            return batch["latents"]
        rows: list = [None] * (len(fill["present"]) + len(fill["missing"]))
        for i, row in zip(fill["present"].tolist(), batch["latents"] if batch["latents"] is not None else ()):
            rows[i] = row
        t2i = self.t2i
        for i, entry, pixels in zip(fill["missing"].tolist(), fill["entries"].tolist(), fill["pixels"]):
            rows[i] = self.writer.get_or_compute(entry, lambda pixels=pixels: {"mean_logvar": encode_latent(
                t2i.vae, pixels, t2i.accelerator.device, t2i.vae_dtype)})["mean_logvar"]
        return torch.stack(rows)


def encode_one_prompt(t2i, prompt: str) -> caches.Row:
    """The embeddings of one prompt, encoded alone (the text cache's entry)."""
    return {name: value[0].clone() for name, value in t2i.encode_prompts([prompt]).items()}


class TextFill:
    """The step's side of the prompt-embedding cache; releases the frozen encoders once every entry exists."""

    def __init__(self, t2i, data, options, source: dict, captions: list[str]) -> None:
        self.t2i = t2i
        self.prompts = unique = list(dict.fromkeys(["", *captions]))
        fields = {**source, "what": "prompt embeddings", "captions": caches.digest(unique),
                  "encoders": {k: caches.module_fingerprint(v) for k, v in t2i.frozen_encoders.items()},
                  "tokenizers": {k: caches.tokenizer_fingerprint(v) for k, v in t2i.tokenizers.items()},
                  "options": t2i.spec.text_options}
        self.cache = caches.EntryCache(options.folder, "text", fields, len(unique))
        self.reader = self.cache.open(t2i.accelerator, text_fill_mode(t2i, options.fill),
                                      lambda entries: {e: encode_one_prompt(t2i, unique[e]) for e in entries},
                                      options.prune)
        self.writer = caches.EntryWriter(self.cache, self.reader)
        if 0 not in self.reader:  # the empty prompt (entry 0) may never be drawn: encoded now, so the cache can
            self.writer.add(0, encode_one_prompt(t2i, ""))  # complete and the encoders go
        served = data.samples.served
        lookup = {c: i for i, c in enumerate(unique)}
        served.text, served.caption_rows, served.empty_row = self.reader, [lookup[c] for c in captions], lookup[""]

    @property
    def folder(self):
        return self.cache.folder

    def cond(self, batch: dict) -> dict[str, torch.Tensor]:
        """{name: (B, ...)} on the CPU: the served rows, and the missing captions encoded (or found since)."""
        fill = batch.get("text_fill")
        if fill is None:
            self.release_when_complete()
            return batch["text"]
        got = [served if served is not None else self.writer.get_or_compute(
            row, lambda row=row: encode_one_prompt(self.t2i, self.prompts[row]))
            for row, served in zip(fill["rows"], fill["got"])]
        self.release_when_complete()
        return {name: torch.stack([g[name] for g in got]) for name in got[0]}

    def release_when_complete(self) -> None:
        """Every embedding is computed: the frozen encoders can go."""
        if self.t2i.frozen_encoders and self.writer.complete:
            self.t2i.frozen_encoders = {}
            gc.collect()
