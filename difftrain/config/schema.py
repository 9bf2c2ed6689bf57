"""Typed schemas of every config node: one frozen dataclass per registered option, plus the top level.

Pure Python (no torch): validation runs before any heavy import. Each field carries its type,
default, bounds or choices and a one-line doc (shown by `difftrain components` and in
docs/configuration.md). Ints are accepted where floats are expected (YAML writes `0` for 0.0).
The schema is the source of truth for every default: conf/<group>/<option>.yaml shows the same values
(tests/config/test_yaml_matches_schema.py), and a preset file (`defaults: [base]`) changes only its keys.
Rules that span keys live in difftrain/config/rules.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from difftrain.config.fields import opt
from difftrain.config.schema_data import (  # noqa: F401 (the data schemas live there; re-exported)
    MISSING_PATH,
    CaptionedImageDataConfig,
    ImageFolderDataConfig,
    SourcesDataConfig,
)

MODE_SCALE_MAX = 2.0 / (3.141592653589793 - 2.0)  # f_mode is monotone on [-1, 2/(pi-2)]


# ---- scheduler ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DDPMSchedulerConfig:
    name: str = "ddpm"
    num_train_timesteps: int = opt(1000, "number of diffusion timesteps", ge=2)
    beta_schedule: str = opt("linear", "beta schedule", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    beta_start: float = opt(1e-4, "first beta", gt=0, lt=1)
    beta_end: float = opt(0.02, "last beta", gt=0, lt=1)
    rescale_betas_zero_snr: bool = opt(False, "rescale betas to zero terminal SNR")
    clip_sample: bool = opt(True, "clip predicted x0 to [-1, 1] when sampling")
    prediction_type: str = opt("epsilon", "what the model predicts (v_prediction: scheduler=ddpm_v)",
                               choices=("epsilon", "v_prediction", "sample"))


@dataclass(frozen=True)
class FlowMatchSchedulerConfig:
    name: str = "sd3"
    num_train_timesteps: int = opt(1000, "number of discrete training sigmas", ge=2)
    shift: float = opt(3.0, "timestep shift of FlowMatchEulerDiscreteScheduler", gt=0)
    precondition_outputs: bool = opt(False, "SD3 preconditioning: model output -> x0 estimate, target x0")


# ---- timestep density ------------------------------------------------------------------------
@dataclass(frozen=True)
class UniformDensityConfig:
    name: str = "uniform"


@dataclass(frozen=True)
class LogitNormalDensityConfig:
    name: str = "logit_normal"
    logit_mean: float = opt(0.0, "mean of the normal before the sigmoid")
    logit_std: float = opt(1.0, "std of the normal before the sigmoid", gt=0)


@dataclass(frozen=True)
class ModeDensityConfig:
    name: str = "mode"
    mode_scale: float = opt(1.29, "scale s of the mode density (monotone for -1 <= s <= 1.7519)",
                            ge=-1.0, le=MODE_SCALE_MAX)


# ---- loss weighting --------------------------------------------------------------------------
@dataclass(frozen=True)
class NoWeightingConfig:
    name: str = "none"


@dataclass(frozen=True)
class SigmaSqrtWeightingConfig:
    name: str = "sigma_sqrt"
    max_weight: float | None = opt(None, "clamp for sigma**-2 (it reaches ~1e5 at SD3's sigma_min); null = none", gt=0)


@dataclass(frozen=True)
class CosmapWeightingConfig:
    name: str = "cosmap"


@dataclass(frozen=True)
class MinSNRWeightingConfig:
    name: str = "min_snr"
    gamma: float = opt(5.0, "Min-SNR gamma (5.0 recommended)", gt=0)


# ---- interpolation / dream / ema -------------------------------------------------------------
# ---- loss: the element-wise loss (components/losses.py) ---------------------------------------------
@dataclass(frozen=True)
class MSELossConfig:
    name: str = "mse"


@dataclass(frozen=True)
class L1LossConfig:
    name: str = "l1"


@dataclass(frozen=True)
class HuberLossConfig:
    name: str = "huber"
    delta: float = opt(0.1, "pseudo-Huber threshold c: quadratic below, linear above (-> mse as c grows); "
                            "with a schedule, its value at the most noise", gt=0)
    schedule: str = opt("constant", "threshold over timesteps: constant, exponential (delta^(t/T)) or snr "
                                    "((1 - delta) / (1 + sigma_t)^2 + delta), kohya's huber_schedule",
                        choices=("constant", "exponential", "snr"))


@dataclass(frozen=True)
class InterpolationConfig:
    name: str = "bilinear"


@dataclass(frozen=True)
class NoDreamConfig:
    name: str = "none"


@dataclass(frozen=True)
class DreamConfig:
    name: str = "on"
    detail_preservation: float = opt(1.0, "p in lambda = noise_level ** p", ge=0)


@dataclass(frozen=True)
class NoEMAConfig:
    name: str = "none"


@dataclass(frozen=True)
class EMAConfig:
    name: str = "ema"
    decay: float = opt(0.9999, "maximum decay", ge=0, le=1)
    min_decay: float = opt(0.0, "minimum decay", ge=0, le=1)
    update_after_step: int = opt(0, "optimizer steps before EMA starts averaging", ge=0)
    use_ema_warmup: bool = opt(False, "decay = 1 - (1 + k/inv_gamma)^-power instead of (1+k)/(10+k)")
    inv_gamma: float = opt(1.0, "warmup inverse gamma", gt=0)
    power: float = opt(2 / 3, "warmup power (ema=ema_warmup sets 0.75)", gt=0)
    foreach: bool = opt(True, "fused multi-tensor update")
    offload: bool = opt(False, "keep the EMA weights in pinned CPU memory")


@dataclass(frozen=True)
class PostHocEMAConfig:
    name: str = "posthoc"
    sigma_rels: list[float] = opt(doc="relative std of each tracked power-function EMA profile (the first one "
                                      "is the run's EMA weights); each in (0, 0.3]", factory=lambda: [0.05, 0.10])
    snapshot_every: int = opt(500, "optimizer steps between snapshots of every profile (and one at the end)", ge=1)
    snapshot_dtype: str = opt("fp32", "storage dtype of the snapshots in RUN_DIR/ema_snapshots",
                              choices=("fp32", "bf16"))


# ---- model / data ----------------------------------------------------------------------------
@dataclass(frozen=True)
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
    label_dropout: float = opt(0.1, "probability of training a sample without its label: one more, learned "
                                    "'no label' class embedding (the last one of a pretrained UNet) for "
                                    "classifier-free guidance; 0 = none", ge=0, lt=1)
    guidance_scale: float = opt(1.4, "classifier-free guidance of class-conditional samples: eps_null + s (eps_label "
                                     "- eps_null); 1 = none (needs label_dropout > 0)", ge=0)


@dataclass(frozen=True)
class DigitsDataConfig:
    name: str = "digits"
    resolution: int = opt(8, "image size (the digits are 8x8; other sizes resize with `interpolation`)", ge=1)
    random_flip: bool = opt(False, "random horizontal flip")
    num_classes: int = opt(10, "number of labels", ge=1, le=10)
    channels: int = opt(1, "grayscale", choices=(1,))
    validation_split: float = opt(0.0, "samples held out for the validation loss: a fraction (< 1) or a count; "
                                       "0 = the validation loss reads the first training samples", ge=0)


# CaptionedImageDataConfig, ImageFolderDataConfig, SourcesDataConfig: config/schema_data.py (imported at the end)


# ---- optimisation ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AdamWConfig:
    name: str = "adamw"
    lr: float = opt(2e-3, "learning rate", gt=0)
    betas: list[float] = opt(doc="Adam betas", factory=lambda: [0.9, 0.999])
    weight_decay: float = opt(1e-2, "decoupled weight decay", ge=0)
    eps: float = opt(1e-8, "Adam epsilon", gt=0)


@dataclass(frozen=True)
class SGDConfig:
    name: str = "sgd"
    lr: float = opt(1e-2, "learning rate", gt=0)
    momentum: float = opt(0.9, "momentum", ge=0, lt=1)
    weight_decay: float = opt(0.0, "L2 weight decay", ge=0)
    nesterov: bool = opt(False, "Nesterov momentum")


@dataclass(frozen=True)
class LRSchedulerConfig:
    """lr_scheduler=constant (and the base of the others): diffusers' schedules over trainer.max_steps."""

    name: str = "constant"
    warmup_steps: int | float = opt(0, "linear warm-up (lr_scheduler=constant has none: keep 0)", ge=0)


@dataclass(frozen=True)
class WarmupLRSchedulerConfig(LRSchedulerConfig):
    name: str = "linear"
    warmup_steps: int | float = opt(0.05, "linear warm-up: a fraction of trainer.max_steps (< 1) or a number "
                                          "of steps", ge=0)


@dataclass(frozen=True)
class CosineLRSchedulerConfig(WarmupLRSchedulerConfig):
    name: str = "cosine"
    num_cycles: float = opt(0.5, "periods of the cosine (0.5 = one half-wave from the peak down to 0)", gt=0)


@dataclass(frozen=True)
class CosineRestartsLRSchedulerConfig(WarmupLRSchedulerConfig):
    name: str = "cosine_with_restarts"
    num_cycles: int = opt(1, "cosine cycles, each restarting from the peak (diffusers' hard restarts)", ge=1)


@dataclass(frozen=True)
class PolynomialLRSchedulerConfig(WarmupLRSchedulerConfig):
    name: str = "polynomial"
    power: float = opt(1.0, "polynomial power (1.0 = linear decay)", gt=0)


# ---- top-level sections ----------------------------------------------------------------------
@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int = opt(900, "optimizer steps", ge=1)
    batch_size: int = opt(64, "per-process micro-batch size", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)
    max_grad_norm: float | None = opt(1.0, "gradient clipping norm; null = no clipping", gt=0)
    mixed_precision: str = opt("no", "autocast dtype", choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = opt(False, "recompute activations in backward")
    checkpoint_every: int = opt(500, "steps between checkpoints (and one at the end); 0 = none (a signal or "
                                 "checkpoint_every_minutes still checkpoints; final/ is always written)", ge=0)
    checkpoints_total_limit: int | None = opt(2, "keep this many newest checkpoints; null = all", ge=1)
    checkpoint_on_signals: list[str] = opt(  # noqa: RUF009 (opt() returns a dataclasses.field)
        doc="signals that make the run finish its step, write a checkpoint and exit 75 (preemption); [] = none",
        factory=lambda: ["SIGTERM", "SIGUSR1"])
    checkpoint_every_minutes: float | None = opt(None, "also checkpoint when this many minutes passed since the "
                                                       "last checkpoint (preemptible machines); null = off", gt=0)
    validate_every: int = opt(500, "steps between validations (and one at the end); 0 = never", ge=0)
    log_every: int = opt(50, "steps between metric lines", ge=1)
    deterministic: bool = opt(False, "torch deterministic algorithms (bitwise GPU runs, slower)")
    cpu: bool = opt(False, "force CPU even when an accelerator is present")
    progress: bool = opt(True, "rich progress bar")
    num_workers: int = opt(0, "DataLoader worker processes decoding images ahead of the step (0 = in the "
                              "training process); the batches are the same for any number", ge=0)
    prefetch_factor: int = opt(2, "micro-batches each worker prepares ahead", ge=1)
    compile: str = opt("none", "torch.compile the trained module in place: none, full (the whole module) or "
                               "regional (each repeated UNet/transformer block: far shorter compile)",
                       choices=("none", "full", "regional"))
    allow_tf32: bool = opt(True, "TF32 matmuls and cuDNN convolutions on GPUs that have them (off when "
                                 "trainer.deterministic)")
    channels_last: bool | None = opt(None, "UNet weights and activations in channels_last memory format; "
                                           "null = on CUDA only")


@dataclass(frozen=True)
class NoiseConfig:
    offset: float = opt(0.0, "noise offset: eps += offset * randn(B, C, 1, 1)", ge=0)
    input_perturbation: float = opt(0.0, "perturb the noise used for x_t only (0.1 recommended)", ge=0)


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = opt(True, "evaluate at the end of the run")
    samples_per_label: int = opt(20, "class-conditional samples per label", ge=1)
    inference_steps: int = opt(50, "sampler steps", ge=1)
    seed: int = opt(1234, "sampling seed", ge=0)
    objective: str = opt("accuracy", "the number a sweeper optimises (Optuna): accuracy (maximise) or a loss "
                         "(minimise)", choices=("accuracy", "val_loss", "val_loss_ema", "loss"))


# experiment trackers through accelerate's tracker API (engine/trackers.py); the optional extra of each
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}  # name -> the module it imports


@dataclass(frozen=True)
class LoggingConfig:
    report_to: list[str] = opt(  # noqa: RUF009 (opt() returns a dataclasses.field)
        doc="experiment trackers that get the scalars, sample grids and config: tensorboard, wandb, mlflow, "
            "comet_ml, aim, clearml, dvclive (pip install \"difftrain[wandb]\" ...); [] = metrics.jsonl only",
        factory=lambda: ["tensorboard"])
    project: str = opt("difftrain", "tracker project (W&B project, MLflow experiment, Comet/ClearML project)")
    run_name: str | None = opt(None, "tracker run name; null = the run folder's name")
    mlflow_tracking_uri: str | None = opt(None, "MLflow tracking URI (sqlite:///mlflow.db, http://host:5000); "
                                                "null = MLFLOW_TRACKING_URI or MLflow's default")


@dataclass(frozen=True)
class ExportConfig:
    lora_formats: list[str] = opt(  # noqa: RUF009 (opt() returns a dataclasses.field)
        doc="LoRA files in final/: diffusers (pytorch_lora_weights.safetensors, always written) and kohya "
            "(also lora_kohya.safetensors, the layout ComfyUI and A1111 load: sd15, sdxl, flux)",
        factory=lambda: ["diffusers"])


@dataclass(frozen=True)
class HubConfig:
    push_on_finish: bool = opt(False, "upload final/ to hub.repo_id at the end of the run (difftrain push does "
                                      "it later)")
    repo_id: str | None = opt(None, "Hugging Face model repository, org/name")
    private: bool = opt(False, "create the repository private")


TOP_LEVEL_SCALARS = {
    "seed": (int, opt(0, "the one seed of the run", ge=0)),
    "output_dir": (str | None, opt(None, "run folder; null = outputs/<timestamp>")),
    "resume": (str | None, opt(None, "'latest' or a checkpoint folder (with the same output_dir)")),
}
SECTIONS = {"trainer": TrainerConfig, "noise": NoiseConfig, "validation": ValidationConfig, "eval": EvalConfig,
            "logging": LoggingConfig, "export": ExportConfig, "hub": HubConfig}
GROUPS = ("scheduler", "weighting_scheme", "loss_weighting", "loss", "interpolation", "dream", "ema",
          "model", "data", "optimizer", "lr_scheduler", "distributed", "lora")

