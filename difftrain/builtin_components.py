"""The built-in catalogue: every config group option difftrain ships, registered on import.

One line per option; conf/<group>/<name>.yaml exists for each (tests/engine/test_docs.py checks the
1:1 mirror, tests/config/test_yaml_matches_schema.py that the YAML shows the schema's defaults). An option
that differs from a sibling by one key is a preset: same target and schema, and a YAML file that is
`defaults: [sibling]` plus that key (ddpm_v, ema_warmup, deepspeed_zero3). An absent component is spelled
`none` in every group. Targets are imported only when the component is built.
"""

from __future__ import annotations

from difftrain.config import schema as s
from difftrain.config import schema_distributed as sd
from difftrain.config import schema_t2i as t
from difftrain.registry import register

C = "difftrain.components"
E = "difftrain.engine"
D = "difftrain.data"
F = "difftrain.families"

# scheduler: the diffusion formulation (what x_t and the target are)
register("scheduler", "ddpm", f"{C}.noise_schedules:build_schedule", "DDPM, epsilon prediction",
         s.DDPMSchedulerConfig)
register("scheduler", "ddpm_v", f"{C}.noise_schedules:build_schedule", "DDPM, v_prediction (preset of ddpm)",
         s.DDPMSchedulerConfig)
register("scheduler", "sd3", f"{C}.noise_schedules:build_schedule",
         "rectified flow matching as in SD3 (FlowMatchEulerDiscreteScheduler, shift 3.0)",
         s.FlowMatchSchedulerConfig)

# weighting_scheme: the density timesteps are drawn from
register("weighting_scheme", "uniform", f"{C}.weighting:build_density", "u ~ U[0, 1): every timestep equally",
         s.UniformDensityConfig)
register("weighting_scheme", "logit_normal", f"{C}.weighting:build_density",
         "u = sigmoid(N(logit_mean, logit_std)) (SD3 default)", s.LogitNormalDensityConfig)
register("weighting_scheme", "mode", f"{C}.weighting:build_density",
         "mode density with heavy middle, scale mode_scale (SD3 paper)", s.ModeDensityConfig)

# loss_weighting: per-sample weight of the MSE
register("loss_weighting", "none", f"{C}.weighting:build_loss_weighting", "w = 1", s.NoWeightingConfig)
register("loss_weighting", "sigma_sqrt", f"{C}.weighting:build_loss_weighting",
         "w = sigma^-2 (SD3 'sigma_sqrt'), optional max_weight clamp", s.SigmaSqrtWeightingConfig)
register("loss_weighting", "cosmap", f"{C}.weighting:build_loss_weighting",
         "w = 2 / (pi (1 - 2 sigma + 2 sigma^2)) (SD3 cosmap)", s.CosmapWeightingConfig)
register("loss_weighting", "min_snr", f"{C}.weighting:build_loss_weighting",
         "Min-SNR-gamma for epsilon, v, sample and flow targets", s.MinSNRWeightingConfig)

# loss: the element-wise loss, before the mask, the per-sample mean and loss_weighting
register("loss", "mse", f"{C}.losses:build_loss", "squared error (diffusers' scripts)", s.MSELossConfig)
register("loss", "l1", f"{C}.losses:build_loss", "absolute error", s.L1LossConfig)
register("loss", "huber", f"{C}.losses:build_loss",
         "pseudo-Huber 2c(sqrt(r^2+c^2)-c), threshold delta, constant or timestep-dependent (kohya)",
         s.HuberLossConfig)

# interpolation: resize filter of image data
for mode, blurb in (("bilinear", "bilinear"), ("bicubic", "bicubic"), ("box", "box (PIL only)"),
                    ("nearest", "nearest (PIL-compatible legacy)"), ("nearest_exact", "nearest, exact"),
                    ("hamming", "Hamming (PIL only)"), ("lanczos", "Lanczos (PIL only; diffusers' default)")):
    register("interpolation", mode, f"{C}.interpolation:build_interpolation", f"{blurb} resize filter",
             s.InterpolationConfig)

# dream: DREAM noise rectification
register("dream", "none", f"{C}.dream:build_dream", "no DREAM", s.NoDreamConfig)
register("dream", "on", f"{C}.dream:build_dream",
         "DREAM with detail_preservation p (epsilon, v, sample and flow)", s.DreamConfig)

# ema: exponential moving average of the weights
register("ema", "none", f"{C}.ema_factory:build_ema", "no EMA", s.NoEMAConfig)
register("ema", "ema", f"{C}.ema_factory:build_ema", "EMA, diffusers schedule (1+k)/(10+k) capped at decay",
         s.EMAConfig)
register("ema", "ema_warmup", f"{C}.ema_factory:build_ema",
         "EMA with power warm-up 1-(1+k/inv_gamma)^-power, power 0.75 (diffusers' unconditional script; "
         "preset of ema)", s.EMAConfig)
register("ema", "posthoc", f"{C}.ema_factory:build_ema",
         "post-hoc EMA (EDM2): power-function EMAs of sigma_rels, snapshotted for difftrain ema-synth/ema-sweep",
         s.PostHocEMAConfig)

# model, data, optimizer, lr_scheduler (engine side)
register("model", "unet2d", f"{F}.unet2d:UNet2DFamily", "UNet2DModel, class-conditional, built or loaded",
         s.UNet2DConfig)
register("data", "digits", f"{D}.sources:build_digits",
         "UCI handwritten digits shipped with scikit-learn (1,797 8x8 images, 10 classes)", s.DigitsDataConfig)
register("data", "imagefolder", f"{D}.sources:build_imagefolder",
         "a folder of images; class subfolders give labels; captions from metadata.jsonl or .txt files",
         s.ImageFolderDataConfig)
register("data", "dreambooth", f"{D}.sources:build_imagefolder",
         "imagefolder with DreamBooth prior preservation (class images generated when missing; preset of imagefolder)",
         s.ImageFolderDataConfig)
register("data", "sources", f"{D}.multi:build_sources",
         "several image folders / datasets in one run, each with its repeats, captions, masks and prior",
         s.SourcesDataConfig)
register("optimizer", "adamw", f"{E}.optim:build_optimizer", "torch.optim.AdamW", s.AdamWConfig)
register("optimizer", "sgd", f"{E}.optim:build_optimizer", "torch.optim.SGD", s.SGDConfig)
register("optimizer", "adamw8bit", f"{E}.optim:build_optimizer", "bitsandbytes AdamW8bit (where it works)",
         s.AdamWConfig)
register("lr_scheduler", "constant", f"{E}.optim:build_lr_scheduler",
         "diffusers.optimization 'constant' schedule (no warm-up)", s.LRSchedulerConfig)
for sched, schema in (("constant_with_warmup", s.WarmupLRSchedulerConfig), ("linear", s.WarmupLRSchedulerConfig),
                      ("cosine", s.CosineLRSchedulerConfig), ("cosine_with_restarts", s.CosineRestartsLRSchedulerConfig),
                      ("polynomial", s.PolynomialLRSchedulerConfig)):
    register("lr_scheduler", sched, f"{E}.optim:build_lr_scheduler",
             f"diffusers.optimization '{sched}' schedule with linear warm-up", schema)

# distributed: how the processes of one run share the work (accelerate builds the engine)
register("distributed", "ddp", f"{E}.distributed:ddp_accelerator_kwargs",
         "accelerate with torch DDP (also the single-process case); gloo on CPU, nccl on GPUs", sd.DDPConfig)
register("distributed", "deepspeed_zero2", f"{E}.distributed:deepspeed_accelerator_kwargs",
         "DeepSpeed ZeRO-2 through accelerate: optimizer state and gradients sharded", sd.DeepSpeedConfig)
register("distributed", "deepspeed_zero3", f"{E}.distributed:deepspeed_accelerator_kwargs",
         "DeepSpeed ZeRO-3 through accelerate: parameters sharded too (EMA gathered in bounded groups; "
         "preset of deepspeed_zero2)",
         sd.DeepSpeedConfig)
register("distributed", "fsdp2", f"{E}.strategy_fsdp:fsdp2_accelerator_kwargs",
         "torch FSDP2 (fully_shard per repeated block) through accelerate: parameters, gradients and optimizer "
         "state sharded; sharded checkpoints (torch.distributed.checkpoint)", sd.FSDP2Config)

# latent text-to-image families (pretrained diffusers pipelines), their data source and LoRA
register("model", "sd15", f"{F}.sd15:SD15Family",
         "Stable Diffusion 1.x/2.x pipeline (UNet2DConditionModel, CLIP, VAE) from a hub id or folder",
         t.SD15ModelConfig)
register("model", "sdxl", f"{F}.sdxl:SDXLFamily",
         "Stable Diffusion XL pipeline (UNet2DConditionModel, 2 CLIP, VAE) with micro-conditioning", t.SDXLModelConfig)
register("model", "sd3", f"{F}.sd3:SD3Family",
         "Stable Diffusion 3 pipeline (SD3Transformer2DModel, 2 CLIP + T5, VAE), rectified flow", t.SD3ModelConfig)
register("model", "flux", f"{F}.flux:FluxFamily",
         "FLUX.1 pipeline (FluxTransformer2DModel, CLIP + T5, VAE), rectified flow with its dynamic shift",
         t.FluxModelConfig)
register("data", "hf", f"{D}.sources:build_hf",
         "a Hugging Face `datasets` dataset (hub id, save_to_disk folder or local folder) of images and captions",
         t.HFDataConfig)
register("lora", "none", f"{F}.lora:build_lora", "train the full denoiser", t.NoLoraConfig)
register("lora", "on", f"{F}.lora:build_lora",
         "LoRA adapters (peft) on the denoiser, optionally the CLIP text encoders; saved in diffusers' LoRA format",
         t.LoraOnConfig)
