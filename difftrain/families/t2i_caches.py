"""The latent and prompt-embedding caches of the latent text-to-image families (data/cache.py stores them).

Latents: per sample (every position of the index, held-out ones included), the VAE posterior parameters
(mean and logvar) of its one cached crop, of its mirror image when the data flips, and the crop offset (so a
family's micro-conditioning matches the cached latent). Random crops are therefore drawn once per sample
when latents are cached (data/samples.py `cache_crop`); flips still change per epoch.

Text: the embeddings of the empty prompt and of every distinct caption, one row each; each sample points at
its caption's row, a dropped caption at the empty prompt's.
"""

from __future__ import annotations

import torch

from difftrain.data import cache as caches
from difftrain.data.samples import CacheItems, unit_range

TEXT_BATCH = 16  # prompts encoded at once while filling the text cache


def latent_fields(t2i, data, options, source: dict) -> dict:
    """Everything that changes the cached latents (the cache key)."""
    samples = data.samples
    random_crop = not samples.augment.center_crop
    return {**source, "what": "vae latent distributions", "vae": caches.module_fingerprint(t2i.vae),
            "vae_config": dict(t2i.vae.config), "images": data.fingerprint, "flips": bool(data.random_flip),
            "buckets": [list(b) for b in data.plan.buckets], "bucket_of": caches.digest(data.plan.bucket_of),
            "channels": data.channels, **dict(options.key_fields),
            "crop_seed": samples.seed if random_crop else None}


def encode_latents(vae, pixels: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist.parameters.float().cpu()


def build_latent_cache(t2i, data, options, source: dict):
    """The latent cache of `data` (built where missing, split across ranks); the data serves it from now on."""
    samples, flips = data.samples, bool(data.random_flip)
    device, dtype, batch_size = t2i.accelerator.device, t2i.vae_dtype, options.batch_size

    def compute(items: list[int]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        pending: dict[tuple[int, int], list] = {}  # bucket size -> [(position, pixels, crop)]

        def flush(size):
            group = pending.pop(size)
            pixels = unit_range(torch.stack([x for _, x, _ in group]))
            encoded = [encode_latents(t2i.vae, pixels, device, dtype)]
            if flips:
                encoded.append(encode_latents(t2i.vae, pixels.flip(-1), device, dtype))
            for j, (position, _, crop) in enumerate(group):
                out[f"{position}.mean_logvar"] = encoded[0][j].clone()
                if flips:
                    out[f"{position}.mean_logvar_flip"] = encoded[1][j].clone()
                out[f"{position}.crop"] = torch.tensor(crop, dtype=torch.long)

        loader = torch.utils.data.DataLoader(CacheItems(samples, items), batch_size=None,
                                             num_workers=options.num_workers)
        for position, pixels, crop in loader:
            size = tuple(pixels.shape[-2:])
            pending.setdefault(size, []).append((position, pixels, crop))
            if len(pending[size]) == batch_size:
                flush(size)
        for size in sorted(pending):
            flush(size)
        return out

    cache = caches.ShardedCache(options.folder, "latents", latent_fields(t2i, data, options, source),
                                len(data.index))
    reader = cache.build(compute, t2i.accelerator, options.prune)
    samples.served.latents = reader
    return reader


def build_text_cache(t2i, data, options, source: dict, captions: list[str]):
    """The prompt-embedding cache of the captions (and ""); the data serves rows of it from now on."""
    unique = list(dict.fromkeys(["", *captions]))
    fields = {**source, "what": "prompt embeddings", "captions": caches.digest(unique),
              "encoders": {k: caches.module_fingerprint(v) for k, v in t2i.frozen_encoders.items()},
              "tokenizers": {k: caches.tokenizer_fingerprint(v) for k, v in t2i.tokenizers.items()},
              "options": t2i.spec.text_options}

    def compute(items: list[int]) -> dict[str, torch.Tensor]:
        out = {}
        for start in range(0, len(items), TEXT_BATCH):
            chunk = items[start : start + TEXT_BATCH]
            encoded = t2i.encode_prompts([unique[i] for i in chunk])
            for j, item in enumerate(chunk):
                out.update({f"{item}.{name}": value[j].clone() for name, value in encoded.items()})
        return out

    cache = caches.ShardedCache(options.folder, "text", fields, len(unique))
    reader = cache.build(compute, t2i.accelerator, options.prune)
    served = data.samples.served
    lookup = {c: i for i, c in enumerate(unique)}
    served.text, served.text_names = reader, tuple(reader.names(0))
    served.caption_rows, served.empty_row = [lookup[c] for c in captions], lookup[""]
    return reader
