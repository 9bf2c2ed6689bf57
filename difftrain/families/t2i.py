"""Shared code of the latent text-to-image families (SD 1.x/2.x, SD3) on the engine's ModelBundle seam.

What the engine trains is a `T2IModule`: the denoiser, plus the text encoders when LoRA trains them
(then prompts are encoded inside forward, so DDP, autocast, clipping, EMA and checkpoints see them).
`prepare()` runs once before the optimizer is built: weight dtype from the accelerator; frozen parts
(VAE, frozen text encoders, the LoRA base) cast to it; adapters added; trainable weights cast to fp32;
the latent and prompt-embedding caches built (families/cache.py). A family subclass says how to load,
tokenize, encode, call the denoiser and assemble its diffusers pipeline.
"""

from __future__ import annotations

import gc
import json
from contextlib import nullcontext
from pathlib import Path

import torch

from difftrain.data import cache as caches
from difftrain.families import lora as lora_io
from difftrain.data.captions import require_captions
from difftrain.families.unet2d import ModelBundle
from difftrain.errors import UserError

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast(module: torch.nn.Module, device=None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """module.to(device, dtype) without diffusers' warning on every dtype cast (it fires for an empty
    _keep_in_fp32_modules list too); modules that keep parts in fp32 go through their own to()."""
    if dtype is not None:
        if getattr(module, "_keep_in_fp32_modules", None):
            module.to(dtype=dtype)
        else:
            torch.nn.Module.to(module, dtype=dtype)
    return module.to(device) if device is not None else module


class T2IModule(torch.nn.Module):
    """The trainable module: `denoiser`, plus `text_encoders` (all of them) when LoRA trains the CLIPs."""

    def __init__(self, denoiser: torch.nn.Module, encode_fn, call_fn) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.text_encoders: torch.nn.ModuleDict | None = None
        self.encode_fn, self.call_fn = encode_fn, call_fn  # plain functions of the family

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        if "input_ids" in cond:
            cond = self.encode_fn(dict(self.text_encoders.items()), cond["input_ids"])
        return self.call_fn(self.denoiser, x, timesteps, cond)

    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()
        for encoder in (self.text_encoders or {}).values():
            if any(p.requires_grad for p in encoder.parameters()):
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class T2IBundle(ModelBundle):
    """Base of the text-to-image families. Subclasses set the class attributes and the family hooks."""

    family = ""
    denoiser_name = "unet"
    pipeline_classes: tuple[str, ...] = ()
    lora_text_encoders: tuple[str, ...] = ("text_encoder",)
    default_lora_targets: tuple[str, ...] = ()

    def __init__(self, source, index: dict, components: dict, model_cfg: dict, encode_fn, call_fn) -> None:
        from difftrain.families.loading import null_components

        self.source, self.model_cfg = source, model_cfg
        self.null_components = null_components(index)  # passed as None when the pipeline is reloaded
        self.vae = components["vae"]
        self.tokenizers = {k: v for k, v in components.items() if k.startswith("tokenizer") and v is not None}
        self.frozen_encoders = {k: v for k, v in components.items() if k.startswith("text_encoder") and v is not None}
        self.inference_scheduler = components["scheduler"]
        super().__init__(T2IModule(components[self.denoiser_name], encode_fn, call_fn))
        self.lora = None
        self.acc = None
        self.weight_dtype = torch.float32
        self.latent_params = self.text_cache = self.validation_cond = None
        self.validation_prompts: list[str] = []
        self.cache_files: dict[str, str] = {}

    # ---- family hooks ---------------------------------------------------------------------------
    def training_schedule(self, scheduler_cfg: dict):
        raise NotImplementedError

    def export_scheduler(self, schedule):
        """The inference scheduler saved with the outputs and used for validation."""
        raise NotImplementedError

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pipeline(self, model: T2IModule, scheduler):
        """The family's diffusers pipeline around the live modules (text encoders may be None)."""
        raise NotImplementedError

    def prompt_kwargs(self, cond: dict, negative: dict) -> dict:
        raise NotImplementedError

    def latent_multiple(self) -> int:
        """Latent sizes must be multiples of this (UNet downsampling or transformer patches)."""
        return 1

    def save_lora(self, folder: Path, model: T2IModule) -> None:
        raise NotImplementedError

    # ---- set-up ---------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def trains_text(self) -> bool:
        return self.model.text_encoders is not None

    def encoders(self, model: T2IModule | None = None) -> dict:
        model = model if model is not None else self.model
        return dict(model.text_encoders.items()) if model.text_encoders is not None else self.frozen_encoders

    def prepare(self, cfg: dict, data, run_dir: Path, accelerator) -> None:
        from difftrain import registry
        from difftrain.components.lora import cast_training_params

        self.acc, device = accelerator, accelerator.device
        mp = accelerator.mixed_precision
        if mp == "fp16" and device.type != "cuda":
            raise UserError("trainer.mixed_precision=fp16 needs a CUDA GPU (fp16 training on CPU is not supported); "
                            "use trainer.mixed_precision=bf16 or no")
        self.weight_dtype = dtype = DTYPES.get(mp, torch.float32)
        captions = require_captions(data)
        self._check_resolution(data.images.shape[-1])
        self.lora = registry.build("lora", cfg["lora"])
        denoiser = self.model.denoiser
        cast(self.vae.requires_grad_(False), device, dtype)
        for encoder in self.frozen_encoders.values():
            cast(encoder.requires_grad_(False), None, dtype)
        if self.lora is None:
            denoiser.requires_grad_(True)
        else:  # freeze -> cast the base -> adapters -> adapters (only) back to fp32
            cast(denoiser.requires_grad_(False), None, dtype)
            lora_io.add_denoiser_adapter(denoiser, self.lora, self.default_lora_targets)
            if self.lora.train_text_encoder:
                for name in self.lora_text_encoders:
                    lora_io.add_text_encoder_adapter(self.frozen_encoders[name], self.lora)
                self.model.text_encoders = torch.nn.ModuleDict(self.frozen_encoders)
                self.frozen_encoders = {}
            cast_training_params(self.model, torch.float32)
        for encoder in self.frozen_encoders.values():
            encoder.to(device)
        self._build_caches(cfg, data, run_dir, captions)
        prompts = list(cfg["validation"]["prompts"]) or list(dict.fromkeys(captions))[:4]
        self.validation_prompts = prompts
        if not self.trains_text:
            self.validation_cond = (self.encode_prompts(prompts), self.encode_prompts([""]))
        if self.text_cache is not None:  # every embedding is computed: the frozen encoders can go
            self.frozen_encoders = {}
            gc.collect()

    def _check_resolution(self, resolution: int) -> None:
        multiple = self.vae_scale_factor * self.latent_multiple()
        if resolution % multiple:
            raise UserError(f"data.resolution ({resolution}) must be a multiple of {multiple} for this "
                            f"{self.family} model (VAE factor {self.vae_scale_factor} x {self.latent_multiple()})")

    def _build_caches(self, cfg: dict, data, run_dir: Path, captions: list[str]) -> None:
        dcfg = cfg["data"]
        cache_dir = Path(dcfg["cache_dir"]).expanduser() if dcfg.get("cache_dir") else run_dir / "cache"
        prune = not dcfg.get("cache_dir")
        src = {"pretrained": self.source.pretrained, "revision": self.source.revision,
               "variant": self.source.variant, "family": self.family, "dtype": str(self.weight_dtype)}
        if dcfg.get("cache_latents"):
            flips = bool(data.random_flip)
            fields = {**src, "what": "vae latent distributions", "vae": caches.module_fingerprint(self.vae),
                      "vae_config": dict(self.vae.config), "pixels": caches.tensor_digest(data.images),
                      "flips": flips, "resolution": data.images.shape[-1], "center_crop": dcfg.get("center_crop"),
                      "interpolation": cfg["interpolation"]["name"], "n": len(data)}
            tensors, path = caches.cached_tensors(
                cache_dir, "latents", fields, lambda: caches.encode_latent_parameters(
                    self.vae, data.images, flips, cfg["trainer"]["batch_size"], self.acc.device, self.weight_dtype),
                self.acc, prune)
            self.latent_params, self.cache_files["latents"] = tensors["parameters"], str(path)
        cache_text = dcfg.get("cache_text_embeddings")
        if cache_text is None:
            cache_text = not self.trains_text
        if cache_text:
            unique = list(dict.fromkeys(["", *captions]))
            fields = {**src, "what": "prompt embeddings", "captions": caches.digest(captions),
                      "encoders": {k: caches.module_fingerprint(v) for k, v in self.frozen_encoders.items()},
                      "tokenizers": {k: caches.tokenizer_fingerprint(v) for k, v in self.tokenizers.items()},
                      "options": self.text_options()}

            def compute():
                rows = [self.encode_prompts(unique[i : i + 16]) for i in range(0, len(unique), 16)]
                return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

            tensors, path = caches.cached_tensors(cache_dir, "text", fields, compute, self.acc, prune)
            lookup = {c: i for i, c in enumerate(unique)}
            self.text_cache = (tensors, torch.tensor([lookup[c] for c in captions]), lookup[""])
            self.cache_files["text"] = str(path)

    def text_options(self) -> dict:
        return {}

    # ---- per step -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], model: T2IModule | None = None) -> dict[str, torch.Tensor]:
        """Prompt embeddings with the current encoders (no grad), on the CPU."""
        device = self.acc.device if self.acc is not None else "cpu"
        ids = {k: v.to(device) for k, v in self.tokenize(prompts).items()}
        context = self.acc.autocast() if self.acc is not None and self.trains_text else nullcontext()
        with context:
            cond = self.model.encode_fn(self.encoders(model), ids)
        return {k: v.cpu() for k, v in cond.items()}

    def inputs(self, batch: dict, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        indices = batch["indices"]
        if self.latent_params is not None:
            rows = indices
            if batch.get("flips") is not None:  # rows [N, 2N) hold the mirrored images
                rows = indices + self.latent_params.shape[0] // 2 * batch["flips"].long()
            params = self.latent_params[rows].to(device)
        else:
            with torch.no_grad():
                pixels = batch["pixels"].to(device=device, dtype=self.weight_dtype)
                params = self.vae.encode(pixels).latent_dist.parameters
        x0 = self.sample_latents(params.float(), generator)
        captions = batch["captions"]
        if self.trains_text:
            cond = {"input_ids": {k: v.to(device) for k, v in self.tokenize(captions).items()}}
        elif self.text_cache is not None:
            tensors, caption_rows, empty = self.text_cache
            rows = caption_rows[indices].clone()
            rows[batch["dropped"]] = empty
            cond = {k: v[rows].to(device) for k, v in tensors.items()}
        else:
            cond = {k: v.to(device) for k, v in self.encode_prompts(captions).items()}
        return x0, cond

    def sample_latents(self, params: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """z ~ N(mean, std) of the VAE posterior (the mean without a generator), then shift and scale."""
        mean, logvar = params.chunk(2, dim=1)
        z = mean
        if generator is not None:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)
        shift = self.vae.config.get("shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def predict(self, model, x: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return model(x, timesteps, cond)

    # ---- validation, checkpoints, export ----------------------------------------------------------
    def validation_images(self, model, schedule, data, vcfg: dict, device) -> tuple[torch.Tensor, int]:
        prompts, n = self.validation_prompts, vcfg["num_images"]
        cond, negative = self.validation_cond or (self.encode_prompts(prompts, model),
                                                  self.encode_prompts([""], model))
        cond = {k: v.repeat_interleave(n, dim=0).to(device) for k, v in cond.items()}
        negative = {k: v.expand(len(prompts) * n, *v.shape[1:]).to(device) for k, v in negative.items()}
        pipe = self.pipeline(model, self.export_scheduler(schedule))
        pipe.set_progress_bar_config(disable=True)
        extra = {} if vcfg.get("guidance_scale") is None else {"guidance_scale": vcfg["guidance_scale"]}
        resolution = data.images.shape[-1]
        with self.acc.autocast(), torch.no_grad():
            images = pipe(**self.prompt_kwargs(cond, negative), num_inference_steps=vcfg["steps"], height=resolution,
                          width=resolution, generator=torch.Generator("cpu").manual_seed(vcfg["seed"]),
                          output_type="pt", **extra).images
        return images.float().cpu() * 2.0 - 1.0, n

    def checkpoint_tensors(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Only the trainable weights (the whole denoiser, or the adapters): the frozen base is the pipeline's."""
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def load_checkpoint_tensors(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        from difftrain.components.lora import cast_training_params

        expected = {name for name, p in model.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise KeyError(f"the checkpoint's trainable weights differ from this model's (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); was it written with another lora/model config?")
        model.load_state_dict(tensors, strict=False)
        cast_training_params(model, torch.float32)  # trainable weights stay fp32 after every load

    def export(self, final_dir: Path, model, ema, schedule) -> None:
        """Full: final/ is a whole pipeline with the EMA weights (raw ones in final/<denoiser>_raw).
        LoRA: final/pytorch_lora_weights.safetensors (EMA adapters; raw ones in final/raw/) + final/scheduler."""
        from diffusers import DiffusionPipeline

        final_dir.mkdir(parents=True, exist_ok=True)
        scheduler = self.export_scheduler(schedule)
        swap = ema.swapped(model) if ema is not None else nullcontext()
        if self.lora is None:
            with swap:
                pipe = DiffusionPipeline.from_pretrained(
                    self.source.location, revision=self.source.revision, variant=self.source.variant,
                    dtype=torch.float32, **{**self.null_components, "scheduler": scheduler,
                                            self.denoiser_name: model.denoiser})
                pipe.save_pretrained(str(final_dir))
            if ema is not None:
                model.denoiser.save_pretrained(str(final_dir / f"{self.denoiser_name}_raw"))
        else:
            with swap:
                self.save_lora(final_dir, model)
            if ema is not None:
                self.save_lora(final_dir / "raw", model)
            scheduler.save_pretrained(str(final_dir / "scheduler"))
        (final_dir / "difftrain.json").write_text(json.dumps({
            "family": self.family, "pretrained": self.source.pretrained, "revision": self.source.revision,
            "variant": self.source.variant, "lora": self.lora is not None, "ema": ema is not None,
            "prediction_type": schedule.prediction_type, "caches": self.cache_files}, indent=2))
