"""model=sd3 end to end on a tiny SD3-style pipeline (2 CLIP + T5, or without T5): rectified flow with the
pipeline's shift, densities, loss weightings and preconditioning; full and LoRA (transformer and both CLIPs);
exact resume; outputs load into StableDiffusion3Pipeline and generate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_pipes import cache_tensors, lora_file, losses, one_thread, pipeline_dir, t2i_config, write_images

one_thread = pytest.fixture(autouse=True)(one_thread)

TRANSFORMER_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                       "attn.to_q", "attn.to_v", "attn.to_out.0")


@pytest.fixture(scope="session")
def pipes(tmp_path_factory):
    return tmp_path_factory.mktemp("pipes")


@pytest.fixture(scope="session")
def sd3(pipes):
    return pipeline_dir("sd3", pipes)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data") / "photos", captions="txt")


def _generate(pipe) -> None:
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a dog", num_inference_steps=2, height=32, width=32, output_type="pt",
               generator=torch.Generator().manual_seed(0), max_sequence_length=16).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_full_finetune_preconditioned_uses_the_pipeline_scheduler(tmp_path, sd3, images, monkeypatch):
    from diffusers import DiffusionPipeline, SD3Transformer2DModel

    from difftrain.engine.run import run_training
    from difftrain.families.sd3 import SD3Family

    seen = {}
    real = SD3Family.training_schedule

    def spy(self, configured):  # the schedule the engine trains with is what the family returns
        seen["configured"], seen["schedule"] = configured, real(self, configured)
        return seen["schedule"]

    run = tmp_path / "run"
    cfg = t2i_config(run, "sd3", sd3, images, "scheduler.precondition_outputs=true",
                     "weighting_scheme=logit_normal", "loss_weighting=sigma_sqrt", "loss_weighting.max_weight=100",
                     "data.cache_latents=true")
    monkeypatch.setattr(SD3Family, "training_schedule", spy)
    run_training(cfg)
    assert seen["configured"].precondition_outputs  # the `scheduler` group's schedule, replaced
    schedule = seen["schedule"]
    assert schedule.prediction_type == "flow" and schedule.precondition_outputs
    assert schedule.scheduler.config.shift == 3.0  # the pipeline's value (the config rules reject scheduler.shift)
    assert schedule.sigma(torch.tensor([999])).item() == pytest.approx(3 * 0.001 / (1 + 2 * 0.001), rel=1e-4)
    pipe = DiffusionPipeline.from_pretrained(str(run / "final"))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.scheduler.config.shift == 3.0
    _generate(pipe)
    raw = SD3Transformer2DModel.from_pretrained(str(run / "final" / "transformer_raw"))
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), raw.parameters()))

    text = cache_tensors(run, "text")
    assert len(text) == 2 * 5  # 4 distinct captions and the empty prompt, two tensors each
    assert text["4.encoder_hidden_states"].shape == (77 + 77, 32)  # 77 CLIP + 77 T5 tokens, T5 width
    assert text["4.pooled_projections"].shape == (64,)


def test_full_resume_is_bitwise_exact(tmp_path, sd3, images):
    from safetensors.torch import load_file

    from difftrain.engine.run import run_training

    extra = ("weighting_scheme=mode", "loss_weighting=cosmap", "dream=on", "data.random_flip=true",
             "trainer.checkpoints_total_limit=null")
    full = tmp_path / "full"
    run_training(t2i_config(full, "sd3", sd3, images, *extra))
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "final")
    shutil.rmtree(part / "checkpoints" / "checkpoint-4")
    run_training(t2i_config(part, "sd3", sd3, images, *extra, "resume=latest"))
    assert losses(full) == losses(part)
    for sub in ("transformer", "transformer_raw"):
        a = load_file(str(full / "final" / sub / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(part / "final" / sub / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_on_transformer_and_both_clips(tmp_path, sd3, images):
    from diffusers import DiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(t2i_config(run, "sd3", sd3, images, "lora=on", "lora.rank=2", "lora.alpha=4",
                            "lora.train_text_encoder=true", "weighting_scheme=mode", "loss_weighting=min_snr",
                            "trainer.mixed_precision=bf16", "optimizer.lr=0.01", "data.cache_latents=true"))
    tensors, meta = lora_file(run)
    assert {k.split(".")[0] for k in tensors} == {"transformer", "text_encoder", "text_encoder_2"}
    base = DiffusionPipeline.from_pretrained(str(sd3))
    for prefix, module, targets in (
            ("transformer.", base.transformer, TRANSFORMER_TARGETS),
            ("text_encoder.", base.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj")),
            ("text_encoder_2.", base.text_encoder_2, ("q_proj", "k_proj", "v_proj", "out_proj"))):
        names = dict(module.named_modules())
        paths = set()
        for key in (k for k in tensors if k.startswith(prefix)):
            assert key.endswith((".lora_A.weight", ".lora_B.weight")), key
            path = key[len(prefix):].rsplit(".lora_", 1)[0]
            path = path if path in names else path.removeprefix("text_model.")  # flattened CLIPTextModel
            assert path in names and path.endswith(targets), key
            paths.add(path)
        expected = {n for n, m in names.items() if isinstance(m, torch.nn.Linear) and n.endswith(targets)}
        assert paths == expected
        name = prefix[:-1]
        assert meta[f"{name}.r"] == 2 and meta[f"{name}.lora_alpha"] == 4
        assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.startswith(prefix) and "lora_B" in k)
    base.load_lora_weights(str(run / "final"))
    (adapter,) = base.transformer.peft_config
    loaded = get_peft_model_state_dict(base.transformer, adapter_name=adapter)
    assert loaded.keys() == {k.removeprefix("transformer.") for k in tensors if k.startswith("transformer.")}
    assert all(torch.equal(v, tensors[f"transformer.{k}"]) for k, v in loaded.items())
    loaded_te = get_peft_model_state_dict(base.text_encoder_2, adapter_name=adapter)
    assert loaded_te and all(torch.equal(v, tensors[f"text_encoder_2.{k}"]) for k, v in loaded_te.items())
    _generate(base)
    info = json.loads((run / "final" / "difftrain.json").read_text())
    assert info["lora"] and info["prediction_type"] == "flow"


def test_pipeline_without_t5_trains_with_zero_t5_states(tmp_path, pipes, images):
    from diffusers import DiffusionPipeline

    from difftrain.engine.run import run_training

    no_t5 = pipeline_dir("sd3_no_t5", pipes)
    run = tmp_path / "run"
    run_training(t2i_config(run, "sd3", no_t5, images, "trainer.max_steps=2", "ema=none",
                            "model.max_sequence_length=8"))
    # diffusers loads a pipeline saved without T5 only when told so (its own quirk)
    pipe = DiffusionPipeline.from_pretrained(str(run / "final"), text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None
    _generate(pipe)
