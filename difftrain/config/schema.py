"""Typed schemas of every config node: one dataclass per registered option, plus the top level.

Pure Python (no torch): validation runs before any heavy import. Each field carries its type,
default, bounds or choices and a one-line doc (shown by `difftrain components` and in
docs/configuration.md). Ints are accepted where floats are expected (YAML writes `0` for 0.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from difftrain.config.fields import opt

MODE_SCALE_MAX = 2.0 / (3.141592653589793 - 2.0)  # f_mode is monotone on [-1, 2/(pi-2)]
MISSING_PATH = "???"


# ---- scheduler ------------------------------------------------------------------------------
@dataclass
class DDPMSchedulerConfig:
    name: str = "ddpm"
    num_train_timesteps: int = opt(1000, "number of diffusion timesteps", ge=2)
    beta_schedule: str = opt("linear", "beta schedule", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    beta_start: float = opt(1e-4, "first beta", gt=0, lt=1)
    beta_end: float = opt(0.02, "last beta", gt=0, lt=1)
    rescale_betas_zero_snr: bool = opt(False, "rescale betas to zero terminal SNR")
    clip_sample: bool = opt(True, "clip predicted x0 to [-1, 1] when sampling")
    prediction_type: str = opt("epsilon", "what the model predicts", choices=("epsilon", "v_prediction", "sample"))

    def check(self, cfg: dict) -> list[str]:
        errors = []
        if self.beta_end <= self.beta_start:
            errors.append(f"scheduler.beta_end ({self.beta_end}) must be greater than scheduler.beta_start "
                          f"({self.beta_start})")
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            errors.append("scheduler.rescale_betas_zero_snr=true with epsilon prediction has no meaning: at the "
                          "terminal step x_t is pure noise, so x0 = (x_t - sqrt(1-a) eps) / sqrt(a) divides by "
                          "zero; use scheduler=ddpm_v (v_prediction) for zero terminal SNR")
        return errors


@dataclass
class FlowMatchSchedulerConfig:
    name: str = "sd3"
    num_train_timesteps: int = opt(1000, "number of discrete training sigmas", ge=2)
    shift: float = opt(3.0, "timestep shift of FlowMatchEulerDiscreteScheduler", gt=0)
    precondition_outputs: bool = opt(False, "SD3 preconditioning: model output -> x0 estimate, target x0")


# ---- timestep density ------------------------------------------------------------------------
@dataclass
class UniformDensityConfig:
    name: str = "uniform"


@dataclass
class LogitNormalDensityConfig:
    name: str = "logit_normal"
    logit_mean: float = opt(0.0, "mean of the normal before the sigmoid")
    logit_std: float = opt(1.0, "std of the normal before the sigmoid", gt=0)


@dataclass
class ModeDensityConfig:
    name: str = "mode"
    mode_scale: float = opt(1.29, "scale s of the mode density (monotone for -1 <= s <= 1.7519)",
                            ge=-1.0, le=MODE_SCALE_MAX)


# ---- loss weighting --------------------------------------------------------------------------
@dataclass
class NoWeightingConfig:
    name: str = "none"


@dataclass
class SigmaSqrtWeightingConfig:
    name: str = "sigma_sqrt"
    max_weight: float | None = opt(None, "clamp for sigma**-2 (it reaches ~1e5 at SD3's sigma_min); null = none", gt=0)


@dataclass
class CosmapWeightingConfig:
    name: str = "cosmap"


@dataclass
class MinSNRWeightingConfig:
    name: str = "min_snr"
    gamma: float = opt(5.0, "Min-SNR gamma (5.0 recommended)", gt=0)


# ---- interpolation / dream / ema -------------------------------------------------------------
@dataclass
class InterpolationConfig:
    name: str = "bilinear"


@dataclass
class DreamOffConfig:
    name: str = "off"


@dataclass
class DreamConfig:
    name: str = "on"
    detail_preservation: float = opt(1.0, "p in lambda = noise_level ** p", ge=0)


@dataclass
class EMAOffConfig:
    name: str = "off"


@dataclass
class EMAConfig:
    name: str = "ema"
    decay: float = opt(0.9999, "maximum decay", ge=0, le=1)
    min_decay: float = opt(0.0, "minimum decay", ge=0, le=1)
    update_after_step: int = opt(0, "optimizer steps before EMA starts averaging", ge=0)
    use_ema_warmup: bool = opt(False, "decay = 1 - (1 + k/inv_gamma)^-power instead of (1+k)/(10+k)")
    inv_gamma: float = opt(1.0, "warmup inverse gamma", gt=0)
    power: float = opt(2 / 3, "warmup power", gt=0)
    foreach: bool = opt(True, "fused multi-tensor update")
    offload: bool = opt(False, "keep the EMA weights in pinned CPU memory")

    def check(self, cfg: dict) -> list[str]:
        errors = []
        if self.min_decay > self.decay:
            errors.append(f"ema.min_decay ({self.min_decay}) must not exceed ema.decay ({self.decay})")
        max_steps = cfg.get("trainer", {}).get("max_steps")
        if isinstance(max_steps, int) and self.update_after_step >= max_steps:
            errors.append(f"ema.update_after_step ({self.update_after_step}) >= trainer.max_steps ({max_steps}): "
                          "the EMA would never average; lower it or use ema=off")
        return errors


# ---- model / data ----------------------------------------------------------------------------
@dataclass
class UNet2DConfig:
    name: str = "unet2d"
    pretrained: str | None = opt(None, "hub id or local folder of a UNet2DModel; null = build from the keys below")
    sample_size: int = opt(8, "spatial size", ge=1)
    in_channels: int = opt(1, "input channels", ge=1)
    out_channels: int = opt(1, "output channels", ge=1)
    block_out_channels: list[int] = opt(doc="channels per resolution level", factory=lambda: [32, 64])
    layers_per_block: int = opt(1, "resnet layers per block", ge=1)
    down_block_types: list[str] = opt(doc="diffusers down block classes",
                                      factory=lambda: ["DownBlock2D", "DownBlock2D"])
    up_block_types: list[str] = opt(doc="diffusers up block classes",
                                    factory=lambda: ["UpBlock2D", "UpBlock2D"])
    norm_num_groups: int = opt(8, "group-norm groups", ge=1)
    attention_head_dim: int = opt(8, "attention head dim", ge=1)
    num_class_embeds: int | None = opt(10, "number of classes for class conditioning; null = unconditional", ge=1)

    def check(self, cfg: dict) -> list[str]:
        errors = []
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            errors.append(f"model.down_block_types and model.up_block_types need {n} entries, one per "
                          "model.block_out_channels entry")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            errors.append(f"model.block_out_channels {self.block_out_channels} must be divisible by "
                          f"model.norm_num_groups ({self.norm_num_groups})")
        factor = 2 ** (n - 1)
        if self.sample_size % factor:
            errors.append(f"model.sample_size ({self.sample_size}) must be divisible by {factor} "
                          f"for {n} resolution levels")
        return errors


@dataclass
class DigitsDataConfig:
    name: str = "digits"
    resolution: int = opt(8, "image size (the digits are 8x8; other sizes resize with `interpolation`)", ge=1)
    random_flip: bool = opt(False, "random horizontal flip")
    num_classes: int = opt(10, "number of labels", ge=1, le=10)
    channels: int = opt(1, "grayscale", choices=(1,))


@dataclass
class ImageFolderDataConfig:
    name: str = "imagefolder"
    path: str = opt(MISSING_PATH, "folder of images; class subfolders give labels")
    resolution: int = opt(64, "image size after resize and crop", ge=1)
    center_crop: bool = opt(True, "center crop (else random crop)")
    random_flip: bool = opt(False, "random horizontal flip")
    channels: int = opt(3, "1 = grayscale, 3 = RGB", choices=(1, 3))
    num_classes: int | None = opt(None, "number of labels; null = count the class subfolders", ge=1)
    caption_column: str = opt("text", "caption field of metadata.jsonl rows (text-to-image models)")
    instance_prompt: str | None = opt(None, "one prompt for every image (overrides metadata.jsonl and .txt)")
    caption_dropout: float = opt(0.0, "probability of training a sample on the empty prompt", ge=0, le=1)
    cache_latents: bool = opt(False, "encode every image with the VAE once (both flips when random_flip)")
    cache_text_embeddings: bool | None = opt(None, "cache prompt embeddings; null = when the text encoders "
                                                   "are frozen")
    cache_dir: str | None = opt(None, "folder of the caches; null = RUN_DIR/cache")

    def check(self, cfg: dict) -> list[str]:
        from difftrain.config.schema_t2i import data_t2i_checks

        if self.path in (MISSING_PATH, ""):
            return ["data.path is required for data=imagefolder: add data.path=/path/to/images"]
        if not Path(self.path).expanduser().is_dir():
            return [f"data.path '{self.path}' is not a folder: point data.path at a folder of images "
                    "(optionally one subfolder per class)"]
        return data_t2i_checks(cfg.get("data", {}), cfg)


# ---- optimisation ----------------------------------------------------------------------------
@dataclass
class AdamWConfig:
    name: str = "adamw"
    lr: float = opt(2e-3, "learning rate", gt=0)
    betas: list[float] = opt(doc="Adam betas", factory=lambda: [0.9, 0.999])
    weight_decay: float = opt(1e-2, "decoupled weight decay", ge=0)
    eps: float = opt(1e-8, "Adam epsilon", gt=0)

    def check(self, cfg: dict) -> list[str]:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            return [f"optimizer.betas must be two numbers in [0, 1), got {self.betas}"]
        return []


@dataclass
class SGDConfig:
    name: str = "sgd"
    lr: float = opt(1e-2, "learning rate", gt=0)
    momentum: float = opt(0.9, "momentum", ge=0, lt=1)
    weight_decay: float = opt(0.0, "L2 weight decay", ge=0)
    nesterov: bool = opt(False, "Nesterov momentum")


@dataclass
class LRSchedulerConfig:
    name: str = "constant"
    warmup_steps: int = opt(0, "linear warm-up steps", ge=0)
    num_cycles: float = opt(0.5, "cosine: number of half-waves; cosine_with_restarts: restarts", gt=0)
    power: float = opt(1.0, "polynomial power", gt=0)

    def check(self, cfg: dict) -> list[str]:
        max_steps = cfg.get("trainer", {}).get("max_steps")
        if isinstance(max_steps, int) and self.warmup_steps > max_steps:
            return [f"lr_scheduler.warmup_steps ({self.warmup_steps}) exceeds trainer.max_steps ({max_steps})"]
        return []


# ---- top-level sections ----------------------------------------------------------------------
@dataclass
class TrainerConfig:
    max_steps: int = opt(2000, "optimizer steps", ge=1)
    batch_size: int = opt(64, "per-process micro-batch size", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)
    max_grad_norm: float | None = opt(1.0, "gradient clipping norm; null = no clipping", gt=0)
    mixed_precision: str = opt("no", "autocast dtype", choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = opt(False, "recompute activations in backward")
    checkpoint_every: int = opt(500, "steps between checkpoints; 0 = only at the end", ge=0)
    checkpoints_total_limit: int | None = opt(2, "keep this many newest checkpoints; null = all", ge=1)
    validate_every: int = opt(500, "steps between validations; 0 = only at the end", ge=0)
    log_every: int = opt(50, "steps between metric lines", ge=1)
    num_workers: int = opt(0, "DataLoader worker processes", ge=0)
    deterministic: bool = opt(False, "torch deterministic algorithms (bitwise GPU runs, slower)")
    cpu: bool = opt(False, "force CPU even when an accelerator is present")
    progress: bool = opt(True, "rich progress bar")


@dataclass
class NoiseConfig:
    offset: float = opt(0.0, "noise offset: eps += offset * randn(B, C, 1, 1)", ge=0)
    input_perturbation: float = opt(0.0, "perturb the noise used for x_t only (0.1 recommended)", ge=0)


@dataclass
class ValidationConfig:
    labels: list[int] = opt(doc="labels of the sample grid (class-conditional models)",
                            factory=lambda: list(range(10)))
    num_per_label: int = opt(4, "samples per label in the grid", ge=1)
    inference_steps: int = opt(50, "sampler steps", ge=1)
    seed: int = opt(0, "sampling seed", ge=0)
    loss_timesteps: int = opt(8, "fixed timesteps of the validation loss", ge=1)
    loss_batch_size: int = opt(64, "fixed samples of the validation loss", ge=1)
    prompts: list[str] = opt(  # noqa: RUF009 (opt() returns a dataclasses.field)
        doc="text-to-image: prompts of the grid; [] = the first distinct captions of the data (up to 4)",
        factory=list)
    num_images: int = opt(2, "text-to-image: images per prompt (one grid row each)", ge=1)
    steps: int = opt(20, "text-to-image: pipeline inference steps", ge=1)
    guidance_scale: float | None = opt(None, "text-to-image: classifier-free guidance; null = the "
                                       "pipeline's default (SD 7.5, SD3 7.0)", ge=0)


@dataclass
class EvalConfig:
    enabled: bool = opt(True, "evaluate at the end of the run")
    samples_per_label: int = opt(20, "class-conditional samples per label", ge=1)
    inference_steps: int = opt(50, "sampler steps", ge=1)
    seed: int = opt(1234, "sampling seed", ge=0)
    objective: str = opt("accuracy", "the number a sweeper optimises (Optuna): accuracy (maximise) or a loss "
                         "(minimise)", choices=("accuracy", "val_loss", "val_loss_ema", "loss"))


TOP_LEVEL_SCALARS = {
    "seed": (int, opt(0, "the one seed of the run", ge=0)),
    "output_dir": (str | None, opt(None, "run folder; null = outputs/<timestamp>")),
    "resume": (str | None, opt(None, "'latest' or a checkpoint folder (with the same output_dir)")),
}
SECTIONS = {"trainer": TrainerConfig, "noise": NoiseConfig, "validation": ValidationConfig, "eval": EvalConfig}
GROUPS = ("scheduler", "weighting_scheme", "loss_weighting", "interpolation", "dream", "ema",
          "model", "data", "optimizer", "lr_scheduler", "distributed", "lora")
