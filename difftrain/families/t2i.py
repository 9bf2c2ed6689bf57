"""What the latent text-to-image families (SD 1.x/2.x, SD3) share: `LatentTextToImage`, composed by each.

A family file (sd15.py, sd3.py) loads its pipeline's parts and hands them, with a `T2ISpec` of what is its
own (tokenize, encode, call the denoiser, build its diffusers pipeline, its prompt keyword arguments, save
LoRA files, LoRA targets, latent multiple, the exported scheduler), to a `LatentTextToImage`, which does the
rest of the ModelFamily work; the family class forwards the shared protocol methods to it through
`ForwardsToLatentTextToImage` (latent_family.py).

What the engine trains is a `T2IModule`: the denoiser, plus the text encoders when LoRA trains them
(then prompts are encoded inside forward, so DDP, autocast, clipping, EMA and checkpoints see them).
`prepare()` runs once before the optimizer is built: weight dtype from the accelerator; frozen parts
(VAE, frozen text encoders, the LoRA base) cast to it; adapters added; trainable weights cast to fp32;
the latent and prompt-embedding caches built (data/cache.py). A finished run is read back by
`FinishedPipeline` (t2i_finished.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difftrain.data.captions import require_captions
from difftrain.errors import UserError
from difftrain.families import lora as lora_io
from difftrain.families.protocol import CacheOptions, SampleRequest

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pixel_multiple(vae_factor: int, latent_multiple: int) -> int:
    """What image sides must be multiples of: the latent grid's, and 8 (the pipelines check height % 8)."""
    import math

    return math.lcm(vae_factor * latent_multiple, 8)


VAE_TILING_ABOVE = 1536  # model.vae_tiling=null tiles the VAE when a bucket side exceeds this many pixels


def vae_tiling_wanted(setting: bool | None, buckets) -> bool:
    """model.vae_tiling: true/false, or null = when a bucket side exceeds VAE_TILING_ABOVE (a 2048 px image
    encoded in one pass needs several GB of activations)."""
    if setting is not None:
        return bool(setting)
    return any(max(h, w) > VAE_TILING_ABOVE for h, w in buckets)


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
        if "input_ids" in cond:  # the per-sample extras (batch_conditioning) stay beside the embeddings
            extra = {k: v for k, v in cond.items() if k != "input_ids"}
            cond = {**extra, **self.encode_fn(dict(self.text_encoders.items()), cond["input_ids"])}
        return self.call_fn(self.denoiser, x, timesteps, cond)

    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()
        for encoder in (self.text_encoders or {}).values():
            if any(p.requires_grad for p in encoder.parameters()):
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass(frozen=True)
class T2ISpec:
    """What one latent text-to-image family says about itself (plain functions: T2IModule holds two)."""

    name: str                                  # the `model` option
    denoiser: str                              # the pipeline component that trains: "unet" | "transformer"
    lora_text_encoders: tuple[str, ...]        # the encoders lora.train_text_encoder adapts
    lora_targets: tuple[str, ...]              # default lora.target_modules of the denoiser
    latent_multiple: int                       # latent sizes are multiples of this (downsampling or patches)
    tokenize: Callable[[dict, dict, list[str]], dict]  # (tokenizers, encoders, captions) -> token ids
    encode: Callable[[dict, dict], dict]       # (encoders, token ids) -> conditioning kwargs
    call_denoiser: Callable                    # (denoiser, x_t, timesteps, conditioning) -> prediction
    pipeline: Callable                         # (vae, tokenizers, encoders, denoiser, scheduler) -> pipeline
    prompt_kwargs: Callable[[dict, dict], dict]  # (conditioning, negative) -> pipeline prompt_embeds kwargs
    save_lora: Callable[[Path, T2IModule], None]  # write pytorch_lora_weights.safetensors into a folder
    export_scheduler: Callable                 # (pipeline's scheduler, training schedule) -> inference scheduler
    text_options: dict = field(default_factory=dict)  # options that change prompt embeddings (cache key)
    # per-sample conditioning from the data batch (e.g. SDXL's add_time_ids from "original_sizes",
    # "crop_offsets", "target_size"): batch -> {name: tensor}, merged into the conditioning kwargs
    batch_conditioning: Callable[[dict], dict] | None = None
    vae_dtype: torch.dtype | None = None       # the VAE's dtype; None = the weight dtype (SDXL's VAE: fp32)


@dataclass(frozen=True)
class PipelineParts:
    """The loaded components of a pretrained pipeline (text encoders and tokenizers by component name)."""

    source: object                 # families.loading.Source
    null_components: dict          # {name: None} of model_index.json's null entries (passed on reload)
    vae: torch.nn.Module
    tokenizers: dict
    text_encoders: dict
    denoiser: torch.nn.Module
    scheduler: object              # the pipeline's own inference scheduler


def pipeline_parts(source, index: dict, components: dict, denoiser: str) -> PipelineParts:
    from difftrain.families.loading import null_components

    present = {k: v for k, v in components.items() if v is not None}
    return PipelineParts(source, null_components(index), components["vae"],
                         {k: v for k, v in present.items() if k.startswith("tokenizer")},
                         {k: v for k, v in present.items() if k.startswith("text_encoder")},
                         components[denoiser], components["scheduler"])


@dataclass(frozen=True)
class PromptEmbeddings:
    """The validation prompts encoded once with the frozen encoders, and the empty (negative) prompt."""

    prompts: tuple[str, ...]
    cond: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor]


class LatentTextToImage:
    """The shared ModelFamily work of a latent text-to-image family, configured by its `T2ISpec`."""

    def __init__(self, spec: T2ISpec, parts: PipelineParts, options=None) -> None:
        """`options`: the family's model schema (config/schema_t2i.py): quantize_base, vae_tiling."""
        self.spec, self.source, self.null_components = spec, parts.source, parts.null_components
        self.quantize_base = getattr(options, "quantize_base", "none")
        self.vae_tiling = getattr(options, "vae_tiling", None)
        self.vae_tiled = False
        self.vae, self.tokenizers = parts.vae, parts.tokenizers
        self.frozen_encoders = dict(parts.text_encoders)  # emptied when LoRA trains them or the cache has all
        self.inference_scheduler = parts.scheduler
        self.module = T2IModule(parts.denoiser, spec.encode, spec.call_denoiser)
        self.lora = None
        self.accelerator = None
        self.weight_dtype = self.vae_dtype = torch.float32
        self.size: tuple[int, int] | None = None     # (h, w) of validation images: the data's most common bucket
        self.latent_cache = None                       # t2i_caches.LatentFill once opened
        self.text_cache = None                         # t2i_caches.TextFill
        self._epoch = None                             # of the last batch (the lazy fills write at epoch ends)
        self.validation_prompts: list[str] = []
        self.validation_embeddings: PromptEmbeddings | None = None

    # ---- set-up ---------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def trains_text(self) -> bool:
        return self.module.text_encoders is not None

    def encoders(self, model: T2IModule | None = None) -> dict:
        model = model if model is not None else self.module
        return dict(model.text_encoders.items()) if model.text_encoders is not None else self.frozen_encoders

    def prepare(self, data, accelerator, lora, caches: CacheOptions, validation_prompts: list[str]) -> None:
        from difftrain.components.lora import cast_training_params

        self.accelerator, device = accelerator, accelerator.device
        precision = accelerator.mixed_precision
        if precision == "fp16" and device.type != "cuda":
            raise UserError("trainer.mixed_precision=fp16 needs a CUDA GPU (fp16 training on CPU is not supported); "
                            "use trainer.mixed_precision=bf16 or no")
        self.weight_dtype = dtype = DTYPES.get(precision, torch.float32)
        captions = require_captions(data, data.names)
        self.size = tuple(data.validation_size)
        self._check_sizes(data.plan.buckets)
        self.lora = lora
        denoiser = self.module.denoiser
        self.vae_dtype = self.spec.vae_dtype or dtype
        cast(self.vae.requires_grad_(False), device, self.vae_dtype)
        self.vae_tiled = vae_tiling_wanted(self.vae_tiling, data.plan.buckets)
        if self.vae_tiled:
            self.vae.enable_tiling()
        for encoder in self.frozen_encoders.values():
            cast(encoder.requires_grad_(False), None, dtype)
        if lora is None:
            denoiser.requires_grad_(True)
        else:  # freeze -> cast the base -> adapters -> adapters (only) back to fp32
            cast(denoiser.requires_grad_(False), None, dtype)
            if self.quantize_base != "none":  # QLoRA: the frozen base stored quantised (families/quantize.py)
                from difftrain.families.quantize import quantize_frozen_base

                quantize_frozen_base(denoiser, self.quantize_base, device, dtype)
            lora_io.add_denoiser_adapter(denoiser, lora, self.spec.lora_targets)
            if lora.train_text_encoder:
                for name in self.spec.lora_text_encoders:
                    lora_io.add_text_encoder_adapter(self.frozen_encoders[name], lora)
                self.module.text_encoders = torch.nn.ModuleDict(self.frozen_encoders)
                self.frozen_encoders = {}
            cast_training_params(self.module, torch.float32)
        for encoder in self.frozen_encoders.values():
            encoder.to(device)
        self._build_caches(data, caches, captions)
        self.validation_prompts = list(validation_prompts) or list(dict.fromkeys(captions))[:4]
        if not self.trains_text:
            self.validation_embeddings = PromptEmbeddings(tuple(self.validation_prompts),
                                                          self.encode_prompts(self.validation_prompts),
                                                          self.encode_prompts([""]))
        if self.text_cache is not None:  # every embedding is computed (filled ahead): the encoders can go
            self.text_cache.release_when_complete()

    def _check_sizes(self, sizes: list[tuple[int, int]]) -> None:
        multiple = pixel_multiple(self.vae_scale_factor, self.spec.latent_multiple)
        wrong = [f"{h}x{w}" for h, w in sizes if h % multiple or w % multiple]
        if wrong:
            raise UserError(f"image sizes {', '.join(wrong[:3])} are not multiples of {multiple} for this "
                            f"{self.spec.name} model (VAE factor {self.vae_scale_factor} x {self.spec.latent_multiple}); "
                            f"set data.resolution to a multiple of {multiple} (and bucket sides likewise)")

    def _build_caches(self, data, options: CacheOptions, captions: list[str]) -> None:
        from difftrain.families.t2i_caches import LatentFill, TextFill

        source = {"pretrained": self.source.pretrained, "revision": self.source.revision,
                  "variant": self.source.variant, "family": self.spec.name, "dtype": str(self.weight_dtype)}
        if options.latents:  # tiled latents differ slightly: the cache key says so (only when tiled)
            latent_source = {**source, "vae_tiling": True} if self.vae_tiled else source
            self.latent_cache = LatentFill(self, data, options, latent_source)
        cache_text = options.text if options.text is not None else not self.trains_text
        if cache_text:
            self.text_cache = TextFill(self, data, options, source, captions)

    def flush_caches(self) -> None:
        """Write what the lazy cache fills computed so far (the loop calls it at checkpoints and when it stops)."""
        for fill in (self.latent_cache, self.text_cache):
            if fill is not None:
                fill.writer.flush()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    # ---- per step -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], model: T2IModule | None = None) -> dict[str, torch.Tensor]:
        """Prompt embeddings with the current encoders (no grad), on the CPU."""
        encoders = self.encoders(model)
        if not encoders:
            raise ValueError("the frozen text encoders were released once every caption was cached; only the "
                             "validation prompts (encoded in prepare) can be generated")
        device = self.accelerator.device if self.accelerator is not None else "cpu"
        ids = {k: v.to(device) for k, v in self.spec.tokenize(self.tokenizers, encoders, prompts).items()}
        context = self.accelerator.autocast() if self.accelerator is not None and self.trains_text else nullcontext()
        with context:
            cond = self.spec.encode(encoders, ids)
        return {k: v.cpu() for k, v in cond.items()}

    def inputs(self, batch: dict, device, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Latents from the cache rows the data served (or the VAE on the pixels); prompt embeddings from the
        cache rows (or the frozen encoders), or token ids when LoRA trains the encoders."""
        if batch.get("step", -1) >= 0 and batch["epoch"] != self._epoch:  # an epoch's new entries are written
            if self._epoch is not None:                             # before the next epoch reads them
                self.flush_caches()
            self._epoch = batch["epoch"]
        if "latents" in batch:
            params = self.latent_cache.params(batch).to(device)
        else:
            with torch.no_grad():
                pixels = batch["pixels"].to(device=device, dtype=self.vae_dtype)
                params = self.vae.encode(pixels).latent_dist.parameters
        x0 = self.sample_latents(params.float(), generator)
        captions = batch["captions"]
        if self.trains_text:
            ids = self.spec.tokenize(self.tokenizers, self.encoders(), captions)
            cond = {"input_ids": {k: v.to(device) for k, v in ids.items()}}
        elif "text" in batch or "text_fill" in batch:
            cond = {k: v.to(device) for k, v in self.text_cache.cond(batch).items()}
        else:
            cond = {k: v.to(device) for k, v in self.encode_prompts(captions).items()}
        if self.spec.batch_conditioning is not None:
            cond.update({k: v.to(device) for k, v in self.spec.batch_conditioning(batch).items()})
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

    def predict(self, model, x_t: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return model(x_t, timesteps, cond)

    # ---- generation, checkpoints, export --------------------------------------------------------
    def validation_request(self, validation: dict, data) -> SampleRequest:
        """The validation prompts (prepare() chose them), `num_images` of each, at the data's most common size."""
        return SampleRequest(prompts=tuple(self.validation_prompts), per_condition=validation["num_images"],
                             steps=validation["steps"], seed=validation["seed"],
                             guidance_scale=validation.get("guidance_scale"), size=tuple(data.validation_size))

    def generate(self, model, schedule, request: SampleRequest, device) -> tuple[torch.Tensor, int]:
        """The family's pipeline around the live modules, fed prompt embeddings (the validation prompts'
        from prepare() while the encoders are frozen), with the scheduler export() writes."""
        prompts, count = list(request.prompts or ()), request.per_condition
        if not prompts:
            raise ValueError(f"model={self.spec.name} generates from prompts: the request has none")
        known = self.validation_embeddings
        if known is not None and known.prompts == tuple(prompts):
            cond, negative = known.cond, known.negative
        else:
            cond, negative = self.encode_prompts(prompts, model), self.encode_prompts([""], model)
        cond = {k: v.repeat_interleave(count, dim=0).to(device) for k, v in cond.items()}
        negative = {k: v.expand(len(prompts) * count, *v.shape[1:]).to(device) for k, v in negative.items()}
        scheduler = self.spec.export_scheduler(self.inference_scheduler, schedule)
        pipe = self.spec.pipeline(self.vae, self.tokenizers, self.encoders(model), model.denoiser, scheduler)
        pipe.set_progress_bar_config(disable=True)
        extra = {} if request.guidance_scale is None else {"guidance_scale": request.guidance_scale}
        height, width = request.size or self.size
        autocast = self.accelerator.autocast() if self.accelerator is not None else nullcontext()
        with autocast, torch.no_grad():
            images = pipe(**self.spec.prompt_kwargs(cond, negative), num_inference_steps=request.steps,
                          height=height, width=width,
                          generator=torch.Generator("cpu").manual_seed(request.seed), output_type="pt",
                          **extra).images
        return images.float().cpu() * 2.0 - 1.0, count

    def checkpoint_tensors(self, model) -> dict[str, torch.Tensor]:
        """Only the trainable weights (the whole denoiser, or the adapters): the frozen base is the pipeline's."""
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def load_checkpoint_tensors(self, model, tensors: dict[str, torch.Tensor]) -> None:
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
        scheduler = self.spec.export_scheduler(self.inference_scheduler, schedule)
        swap = ema.swapped(model) if ema is not None else nullcontext()
        denoiser = self.spec.denoiser
        if self.lora is None:
            with swap:
                pipe = DiffusionPipeline.from_pretrained(
                    self.source.location, revision=self.source.revision, variant=self.source.variant,
                    dtype=torch.float32, **{**self.null_components, "scheduler": scheduler,
                                            denoiser: model.denoiser})
                pipe.save_pretrained(str(final_dir))
            if ema is not None:
                model.denoiser.save_pretrained(str(final_dir / f"{denoiser}_raw"))
        else:
            with swap:
                self.spec.save_lora(final_dir, model)
            if ema is not None:
                self.spec.save_lora(final_dir / "raw", model)
            scheduler.save_pretrained(str(final_dir / "scheduler"))
        cache_files = {kind: str(cache.folder) for kind, cache in (("latents", self.latent_cache),
                                                                 ("text", self.text_cache)) if cache is not None}
        (final_dir / "difftrain.json").write_text(json.dumps({
            "family": self.spec.name, "pretrained": self.source.pretrained, "revision": self.source.revision,
            "variant": self.source.variant, "lora": self.lora is not None, "ema": ema is not None,
            "prediction_type": schedule.prediction_type, "caches": cache_files}, indent=2))
