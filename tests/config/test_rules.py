"""Every rule of difftrain/config/rules.py: triggered by a config written for it, with its exact message, and
no other rule firing; every rule is in RULES and has a one-line doc (the line in docs/configuration.md)."""

from __future__ import annotations

import inspect

import pytest

from difftrain.cli.train import compose_config
from difftrain.config import rules, rules_distributed, rules_recipes, rules_run, rules_t2i, validate
from difftrain.config.rules import RULES
from difftrain.config.validate import ConfigError

T2I = ["model=sd15", "model.pretrained=<pipe>", "data=imagefolder", "data.path=<images>"]
T2I_MODEL = ["model=sd15", "model.pretrained=<pipe>"]
SD3 = ["model=sd3", "model.pretrained=<pipe>", "data=imagefolder", "data.path=<images>"]
IGNORED_SD15 = ("num_train_timesteps, beta_schedule, beta_start, beta_end, clip_sample (only "
                "scheduler.prediction_type and scheduler.rescale_betas_zero_snr apply)")

# (rule, overrides of the default config, the exact messages): <pipe> is a folder with model_index.json,
# <images> an existing folder, <missing> a path that does not exist, <file> a file
CASES = [
    ("resume_needs_output_dir", ["resume=latest"],
     ["resume needs output_dir: pass the run folder to continue, e.g. output_dir=outputs/2026-01-01_12-00-00 "
      "resume=latest"]),
    ("resume_needs_output_dir", ["resume=latest", "output_dir=<missing>"],
     ["resume=latest but output_dir '<missing>' does not exist; pass the folder of the run to continue"]),
    ("fp16_needs_a_gpu", ["trainer.mixed_precision=fp16", "trainer.cpu=true"],
     ["trainer.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no"]),
    ("betas_increase", ["scheduler.beta_start=0.02", "scheduler.beta_end=0.01"],
     ["scheduler.beta_end (0.01) must be greater than scheduler.beta_start (0.02)"]),
    ("zero_terminal_snr_needs_v_or_sample", ["scheduler.rescale_betas_zero_snr=true"],
     ["scheduler.rescale_betas_zero_snr=true with epsilon prediction has no meaning: at the terminal step x_t is "
      "pure noise, so x0 = (x_t - sqrt(1-a) eps) / sqrt(a) divides by zero; use scheduler=ddpm_v (v_prediction) "
      "for zero terminal SNR"]),
    ("scheduler_option_matches_prediction_type", ["scheduler=ddpm_v", "scheduler.prediction_type=sample"],
     ["scheduler=ddpm_v is the v_prediction preset of scheduler=ddpm, but scheduler.prediction_type=sample: use "
      "scheduler=ddpm scheduler.prediction_type=sample"]),
    ("scheduler_option_matches_prediction_type", ["scheduler.prediction_type=v_prediction"],
     ["scheduler=ddpm with scheduler.prediction_type=v_prediction: choose scheduler=ddpm_v, the v_prediction "
      "preset of ddpm"]),
    ("ema_min_decay_below_decay", ["ema.min_decay=0.99", "ema.decay=0.9"],
     ["ema.min_decay (0.99) must not exceed ema.decay (0.9)"]),
    ("ema_starts_before_the_end", ["ema.update_after_step=900"],
     ["ema.update_after_step (900) >= trainer.max_steps (900): the EMA would never average; lower it or use "
      "ema=none"]),
    ("ema_option_matches_warmup", ["ema=ema_warmup", "ema.use_ema_warmup=false"],
     ["ema=ema_warmup with ema.use_ema_warmup=false is plain EMA: use ema=ema (the ema_warmup preset exists to "
      "set use_ema_warmup=true)"]),
    ("ema_option_matches_warmup", ["ema.use_ema_warmup=true"],
     ["ema=ema with ema.use_ema_warmup=true is the warm-up preset: use ema=ema_warmup (its power is 0.75; set "
      "ema.power to change it)"]),
    ("unet_blocks_per_level", ["model.block_out_channels=[32,64,64]"],
     ["model.down_block_types and model.up_block_types need 3 entries, one per model.block_out_channels entry"]),
    ("unet_channels_divisible_by_groups", ["model.norm_num_groups=3"],
     ["model.block_out_channels [32, 64] must be divisible by model.norm_num_groups (3)"]),
    ("unet_sample_size_divisible", ["data.resolution=7"],
     ["model.sample_size (7) must be divisible by 2 for 2 resolution levels"]),
    ("guidance_needs_label_dropout", ["model.label_dropout=0"],
     ["model.guidance_scale=1.4 needs a 'no label' class to guide against: set model.label_dropout (e.g. 0.1), or "
      "model.guidance_scale=1"]),
    ("sample_size_is_data_resolution", ["model.sample_size=16"],
     ["model.sample_size (16) differs from data.resolution (8); leave model.sample_size at ${data.resolution}"]),
    ("data_classes_fit_model", ["model.num_class_embeds=5", "validation.labels=[0,1]"],
     ["data.num_classes (10) exceeds model.num_class_embeds (5)"]),
    ("validation_labels_in_model_classes", ["validation.labels=[0,10]"],
     ["validation.labels [0, 10] must lie in [0, 10)"]),
    ("buckets_are_none_auto_or_sizes", ["data=imagefolder", "data.path=<images>", "data.buckets=square"],
     ["data.buckets must be none, auto or a list of [height, width], not 'square'"]),
    ("buckets_are_none_auto_or_sizes", ["data=imagefolder", "data.path=<images>", "data.buckets=[[64,64,3]]"],
     ["data.buckets [[64, 64, 3]] must be a non-empty list of [height, width] pairs of positive integers, e.g. "
      "data.buckets=[[512,512],[448,576],[576,448]]"]),
    ("validation_split_is_a_fraction_or_count", ["data.validation_split=2.5"],
     ["data.validation_split=2.5: give a fraction below 1 (e.g. 0.05) or a whole count (e.g. 100)"]),
    ("pretrained_pipeline_is_given", [*T2I, "model.pretrained=???"],
     ["model.pretrained is required for model=sd15: add model.pretrained=<hub id or local pipeline folder>, e.g. "
      "model.pretrained=stable-diffusion-v1-5/stable-diffusion-v1-5"]),
    ("pretrained_pipeline_is_given", [*SD3, "model.pretrained=<file>"],
     ["model.pretrained '<file>' is not a folder: give a folder written by save_pretrained (with "
      "model_index.json) or a hub id such as org/name"]),
    ("pretrained_pipeline_is_given", [*T2I, "model.pretrained=<images>"],
     ["model.pretrained '<images>' has no model_index.json: it is not a diffusers pipeline folder (write one "
      "with pipeline.save_pretrained(folder))"]),
    ("pretrained_family_scheduler", [*T2I, "scheduler=sd3"],
     ["model=sd15 cannot train with scheduler=sd3: use scheduler=ddpm (epsilon) or scheduler=ddpm_v "
      "(v_prediction)"]),
    ("pretrained_family_scheduler", [*SD3, "scheduler=ddpm"],
     ["model=sd3 cannot train with scheduler=ddpm: SD3 is a rectified-flow model: use scheduler=sd3"]),
    ("pretrained_family_ignores_scheduler_tables",
     [*T2I, "scheduler=ddpm_v", "scheduler.num_train_timesteps=500", "scheduler.beta_end=0.03"],
     [f"scheduler.num_train_timesteps=500 has no effect with model=sd15: the pipeline's own scheduler config "
      f"supplies {IGNORED_SD15}; remove scheduler.num_train_timesteps",
      f"scheduler.beta_end=0.03 has no effect with model=sd15: the pipeline's own scheduler config supplies "
      f"{IGNORED_SD15}; remove scheduler.beta_end"]),
    ("pretrained_family_ignores_scheduler_tables", [*T2I, "scheduler.clip_sample=false"],
     [f"scheduler.clip_sample=False has no effect with model=sd15: the pipeline's own scheduler config supplies "
      f"{IGNORED_SD15}; remove scheduler.clip_sample"]),
    ("pretrained_family_ignores_scheduler_tables", [*SD3, "scheduler.shift=1.0"],
     ["scheduler.shift=1.0 has no effect with model=sd3: the pipeline's own scheduler config supplies "
      "num_train_timesteps, shift (only scheduler.precondition_outputs applies); remove scheduler.shift"]),
    ("pretrained_family_trains_on_captioned_rgb", ["model=sd15", "model.pretrained=<pipe>"],
     ["model=sd15 trains on captioned images: use data=imagefolder (captions from metadata.jsonl, .txt files or "
      "data.instance_prompt) or data=hf, not data=digits"]),
    ("pretrained_family_trains_on_captioned_rgb", [*T2I, "data.channels=1"],
     ["model=sd15 needs RGB images: data.channels must be 3"]),
    ("latent_resolution_multiple_of_8", [*SD3, "data.resolution=30"],
     ["data.resolution (30) must be a multiple of 8 for model=sd3 (the VAE works on 8x8 patches)"]),
    ("replacement_vae_is_a_folder_or_hub_id", ["model=sdxl", "model.pretrained=<pipe>", "data=imagefolder",
                                               "data.path=<images>", "data.resolution=512", "model.vae=<file>"],
     ["model.vae '<file>' is not a folder: give an AutoencoderKL folder (vae.save_pretrained), a pipeline folder, a "
      "hub id such as madebyollin/sdxl-vae-fp16-fix, or model.vae=null for the pipeline's own VAE"]),
    ("replacement_vae_is_a_folder_or_hub_id", ["model=sdxl", "model.pretrained=<pipe>", "data=imagefolder",
                                               "data.path=<images>", "data.resolution=512", "model.vae=<images>"],
     ["model.vae '<images>' has no config.json (nor vae/config.json): give an AutoencoderKL folder "
      "(vae.save_pretrained), a pipeline folder, a hub id such as madebyollin/sdxl-vae-fp16-fix, or model.vae=null "
      "for the pipeline's own VAE"]),
    ("imagefolder_path_is_a_folder", ["data=imagefolder"],
     ["data.path is required for data=imagefolder: add data.path=/path/to/images"]),
    ("imagefolder_path_is_a_folder", ["data=imagefolder", "data.path=<missing>"],
     ["data.path '<missing>' is not a folder: point data.path at a folder of images (optionally one subfolder "
      "per class)"]),
    ("hf_dataset_is_given", ["model=sd15", "model.pretrained=<pipe>", "data=hf"],
     ["data.dataset is required for data=hf: add data.dataset=<hub id or local folder>"]),
    ("hf_captions_or_instance_prompt",
     ["model=sd15", "model.pretrained=<pipe>", "data=hf", "data.dataset=org/photos", "data.caption_column=null"],
     ["data.caption_column=null needs data.instance_prompt (one prompt for every image)"]),
    ("instance_prompt_not_empty", [*T2I, "data.instance_prompt=''"],
     ["data.instance_prompt must not be empty: give a prompt or null (captions from files)"]),
    ("caption_keys_need_text_to_image",
     ["data=imagefolder", "data.path=<images>", "data.cache_latents=true", "data.caption_dropout=0.5"],
     ["data.cache_latents applies to text-to-image models (model=sd15 or model=sd3), not model=unet2d; remove it",
      "data.caption_dropout applies to text-to-image models (model=sd15 or model=sd3), not model=unet2d; "
      "remove it"]),
    ("sources_entries_are_valid", [*T2I_MODEL, "data=sources"],
     ["data=sources needs data.sources, a list such as '[{path: ./photos}, {path: ./style, repeats: 2}]'"]),
    ("sources_entries_are_valid",
     [*T2I_MODEL, "data=sources", "data.sources=[{path: <images>, repeat: 2}, {kind: hf}, {path: <missing>}, 3]"],
     ["data.sources[0].repeat is not a key of imagefolder sources; entry keys: buckets, caption_column, "
      "caption_dropout, caption_prefix, caption_suffix, class_data_dir, class_image_steps, class_prompt, "
      "instance_prompt, keep_tags, kind, masks, name, num_class_images, num_classes, path, prior_loss_weight, "
      "repeats, resolution, shuffle_tags, tag_dropout, unmasked_weight, with_prior_preservation",
      "data.sources[1].dataset is required for kind: hf (a hub id, a save_to_disk folder or a local folder)",
      "data.sources[2].path '<missing>' is not a folder: give each imagefolder entry the folder of its images",
      "data.sources[3] must be a mapping such as {path: ./photos, repeats: 2}, got 3"]),
    ("recipes_need_text_to_image", ["data=imagefolder", "data.path=<images>", "data.shuffle_tags=true"],
     ["data.shuffle_tags applies to text-to-image models (model=sd15|sdxl|sd3|flux), not model=unet2d; remove it"]),
    ("prior_preservation_is_complete", [*T2I_MODEL, "data=dreambooth", "data.path=<images>"],
     ["data.with_prior_preservation=true needs data.class_prompt (e.g. 'a photo of a dog')",
      "data.with_prior_preservation=true needs data.class_data_dir (e.g. ./class_images/dog)"]),
    ("prior_with_cached_latents_needs_one_size",
     [*T2I, "data.with_prior_preservation=true", "data.class_prompt=dog", "data.class_data_dir=<missing>",
      "data.cache_latents=true", "data.buckets=auto"],
     ["data.with_prior_preservation with data.cache_latents=true needs one image size (class images are cached "
      "at it): set data.buckets=none and one resolution, or data.cache_latents=false"]),
    ("masks_from_files_need_an_image_folder",
     ["model=sd15", "model.pretrained=<pipe>", "data=hf", "data.dataset=org/photos", "data.masks=files"],
     ["data.masks=files reads <stem>_mask.png files beside images; a datasets source has none: use "
      "data.masks=alpha (the image's alpha channel)"]),
    ("random_captions_cannot_cache_text", [*T2I, "data.shuffle_tags=true", "data.cache_text_embeddings=true"],
     ["data.shuffle_tags / tag_dropout change each caption every epoch, so one cached embedding per caption "
      "would be stale: set data.cache_text_embeddings=null (off for these runs) or false"]),
    ("text_encoder_training_cannot_cache",
     [*T2I, "lora=on", "lora.train_text_encoder=true", "data.cache_text_embeddings=true"],
     ["lora.train_text_encoder=true trains the text encoders, so their embeddings change every step and cannot "
      "be cached: set data.cache_text_embeddings=false (or null)"]),
    ("lora_needs_text_to_image", ["lora=on"],
     ["lora=on needs a pretrained text-to-image model (model=sd15 or model=sd3), not model=unet2d; use "
      "lora=none"]),
    ("lora_targets_not_empty",
     [*T2I, "lora=on", "lora.target_modules=[]", "lora.train_text_encoder=true",
      "lora.text_encoder_target_modules=[]"],
     ["lora.target_modules must name at least one module, or be null for the family default",
      "lora.text_encoder_target_modules must name at least one module"]),
    ("quantized_base_needs_lora", [*T2I, "model.quantize_base=nf4"],
     ["model.quantize_base=nf4 quantises the frozen denoiser under LoRA adapters (QLoRA), but lora=none trains "
      "every weight; add lora=on, or set model.quantize_base=none"]),
    ("adam_betas", ["optimizer.betas=[0.9,1.0]"], ["optimizer.betas must be two numbers in [0, 1), got [0.9, 1.0]"]),
    ("warmup_within_max_steps", ["lr_scheduler.warmup_steps=2001"],
     ["lr_scheduler.warmup_steps (2001) exceeds trainer.max_steps (900); use a fraction such as "
      "lr_scheduler.warmup_steps=0.05 to scale with the run"]),
    ("warmup_within_max_steps", ["lr_scheduler.warmup_steps=2.5"],
     ["lr_scheduler.warmup_steps=2.5: give a fraction of trainer.max_steps below 1 (e.g. 0.05) or a whole number "
      "of steps"]),
    ("constant_lr_has_no_warmup", ["lr_scheduler=constant", "lr_scheduler.warmup_steps=10"],
     ["lr_scheduler=constant ignores lr_scheduler.warmup_steps (10): use lr_scheduler=constant_with_warmup "
      "lr_scheduler.warmup_steps=10"]),
    ("deepspeed_option_matches_zero_stage", ["distributed=deepspeed_zero3", "distributed.zero_stage=1"],
     ["distributed=deepspeed_zero3 is the ZeRO-3 preset, but distributed.zero_stage=1: use "
      "distributed=deepspeed_zero2 distributed.zero_stage=1"]),
    ("deepspeed_option_matches_zero_stage", ["distributed=deepspeed_zero2", "distributed.zero_stage=3"],
     ["distributed=deepspeed_zero2 with distributed.zero_stage=3: use distributed=deepspeed_zero3, the ZeRO-3 "
      "preset"]),
    ("offload_param_needs_zero3", ["distributed=deepspeed_zero2", "distributed.offload_param=cpu"],
     ["distributed.offload_param=cpu needs ZeRO-3 (distributed.zero_stage=2); use distributed=deepspeed_zero3"]),
    ("nvme_offload_needs_a_path", ["distributed=deepspeed_zero3", "distributed.offload_optimizer=nvme"],
     ["nvme offload needs distributed.nvme_path=/path/on/a/local/nvme/disk"]),
    ("zero_stage_keys_apply", ["distributed=deepspeed_zero2", "distributed.stage3_prefetch_bucket_size=1"],
     ["distributed.stage3_prefetch_bucket_size=1 has no effect with distributed.zero_stage=2: it applies to "
      "ZeRO-3 (distributed=deepspeed_zero3); remove it"]),
    ("zero_stage_keys_apply", ["distributed=deepspeed_zero3", "distributed.allgather_bucket_size=5"],
     ["distributed.allgather_bucket_size=5 has no effect with distributed.zero_stage=3: it applies to ZeRO-1/2 "
      "(distributed=deepspeed_zero2); remove it"]),
    ("deepspeed_not_with_forced_cpu", ["distributed=deepspeed_zero2", "trainer.cpu=true"],
     ["trainer.cpu=true cannot be combined with DeepSpeed (accelerate runs DeepSpeed on the accelerator); on a "
      "machine without GPUs leave trainer.cpu=false: DeepSpeed picks its CPU accelerator itself"]),
    ("deepspeed_not_with_adamw8bit", ["distributed=deepspeed_zero2", "optimizer=adamw8bit"],
     ["optimizer=adamw8bit is not supported under DeepSpeed; use optimizer=adamw"]),
    ("fsdp2_not_with_forced_cpu", ["distributed=fsdp2", "trainer.cpu=true"],
     ["trainer.cpu=true cannot be combined with distributed=fsdp2 (torch shards over the machine's accelerator "
      "when it has one); on a machine without GPUs leave trainer.cpu=false: FSDP2 then runs on the CPU with gloo "
      "by itself"]),
    ("fsdp2_not_with_adamw8bit", ["distributed=fsdp2", "optimizer=adamw8bit"],
     ["optimizer=adamw8bit cannot step FSDP2's sharded parameters (DTensors): use optimizer=adamw (its state is "
      "sharded with the parameters already)"]),
    ("fsdp2_not_with_compile", ["distributed=fsdp2", "trainer.compile=regional"],
     ["trainer.compile=regional is not supported with distributed=fsdp2 yet (compiling in place before "
      "fully_shard is untested); use trainer.compile=none, or distributed=ddp to compile"]),
    ("fsdp2_not_with_quantized_base", [*T2I, "lora=on", "model.quantize_base=nf4", "distributed=fsdp2"],
     ["model.quantize_base=nf4 cannot be sharded by distributed=fsdp2 (quantised weights are not DTensors); use "
      "model.quantize_base=none, or distributed=ddp for QLoRA"]),
    ("fsdp2_trains_only_the_denoiser", [*T2I, "lora=on", "lora.train_text_encoder=true", "distributed=fsdp2"],
     ["lora.train_text_encoder=true trains weights outside the denoiser, which distributed=fsdp2 does not shard; "
      "set lora.train_text_encoder=false, or use distributed=ddp"]),
    ("fsdp2_not_with_posthoc_ema", ["distributed=fsdp2", "ema=posthoc"],
     ["ema=posthoc is not supported with distributed=fsdp2 yet; use ema=ema (gathered from the shards in bounded "
      "groups) or ema=none"]),
    ("lora_formats_are_known", ["export.lora_formats=[onnx,onnx]"],
     ["export.lora_formats: 'onnx' is not a LoRA format; choose from diffusers, kohya",
      "export.lora_formats=['onnx', 'onnx'] leaves out diffusers, which is always written (the kohya file is "
      "converted from it): use export.lora_formats=[diffusers,kohya]",
      "export.lora_formats=['onnx', 'onnx'] names a format twice; list each once"]),
    ("kohya_lora_format_needs_a_kohya_layout", [*SD3, "lora=on", "export.lora_formats=[diffusers,kohya]"],
     ["export.lora_formats has kohya, but model=sd3 has no kohya LoRA layout that diffusers loads (kohya files "
      "exist for sd15, sdxl and flux); use export.lora_formats=[diffusers]: ComfyUI reads SD3's diffusers file "
      "itself"]),
    ("kohya_lora_format_needs_a_kohya_layout", [*T2I, "export.lora_formats=[diffusers,kohya]"],
     ["export.lora_formats has kohya, but lora=none: a full fine-tune has no LoRA to convert; add lora=on, or use "
      "export.lora_formats=[diffusers]"]),
    ("hub_push_needs_a_repo_id", ["hub.push_on_finish=true"],
     ["hub.push_on_finish=true needs hub.repo_id=org/name, the model repository to upload final/ to"]),
    ("hub_push_needs_a_repo_id", ["hub.repo_id=a/b/c"],
     ["hub.repo_id='a/b/c' is not a Hugging Face repo id: use org/name with letters, digits, '-', '_' and '.'"]),
    ("trackers_known_and_installed", ["logging.report_to=[tensorboard,weights,tensorboard]"],
     ["logging.report_to: 'weights' is not a tracker; choose from tensorboard, wandb, mlflow, comet_ml, aim, "
      "clearml, dvclive", "logging.report_to=['tensorboard', 'weights', 'tensorboard'] names a tracker twice; "
      "list each once"]),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    (root / "pipe").mkdir()
    (root / "pipe" / "model_index.json").write_text("{}")  # validation only checks that it is there
    (root / "images").mkdir()
    (root / "file.txt").write_text("")
    return {"<pipe>": str(root / "pipe"), "<images>": str(root / "images"), "<missing>": str(root / "missing"),
            "<file>": str(root / "file.txt")}


def _fill(text: str, paths: dict) -> str:
    for placeholder, path in paths.items():
        text = text.replace(placeholder, path)
    return text


def test_the_default_config_breaks_no_rule():
    assert rules.check_rules(validate.validate(compose_config([]))) == []


@pytest.mark.parametrize("rule,overrides,messages", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_rule_fires_with_its_exact_message(rule, overrides, messages, paths, monkeypatch):
    composed = compose_config([_fill(o, paths) for o in overrides])
    expected = [_fill(m, paths) for m in messages]
    with pytest.raises(ConfigError) as info:
        validate.validate(composed)
    assert info.value.errors == expected  # through validate(): only this rule's messages, every one of them
    monkeypatch.setattr(validate, "RULES", ())  # the checked config, as the rules see it
    checked = validate.validate(composed)
    fired = {r.__name__: r(checked) for r in RULES if r(checked)}
    assert fired == {rule: expected}


def test_every_rule_is_listed_triggered_and_documented_in_one_line():
    defined = {name for module in (rules, rules_t2i, rules_recipes, rules_run, rules_distributed) for name, fn in inspect.getmembers(module, inspect.isfunction)
               if fn.__module__ == module.__name__ and not name.startswith("_") and name != "check_rules"}
    assert defined == {r.__name__ for r in RULES}  # no rule defined but not run
    assert len(set(RULES)) == len(RULES)
    assert {c[0] for c in CASES} == defined  # every rule has a config that breaks it
    for rule in RULES:
        doc = (rule.__doc__ or "").strip()
        assert doc and "\n" not in doc and doc.endswith((".", ")")), rule.__name__


def test_rules_skip_a_group_whose_own_keys_failed():
    with pytest.raises(ConfigError) as info:  # ema.decay is wrong: no EMA rule runs on a half-checked node
        validate.validate(compose_config(["ema.decay=1.5", "ema.min_decay=0.99", "ema.update_after_step=5000"]))
    assert info.value.errors == ["ema.decay=1.5 must be <= 1"]
