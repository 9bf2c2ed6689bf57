"""ema=posthoc on text-to-image runs (tiny SD1- and SD3-style pipelines): trainable-only snapshots under LoRA, and
`difftrain ema-synth` / `ema-sweep` through the family's own export (a LoRA file per target that
`pipe.load_lora_weights` reads; a whole pipeline for a full fine-tune)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_pipes import one_thread, pipeline_dir, t2i_config

from difftrain.cli.main import main

one_thread = pytest.fixture(autouse=True)(one_thread)
LORA = ("lora=on", "lora.rank=4", "lora.alpha=8", "lora.train_text_encoder=true", "optimizer.lr=0.01",
        "ema=posthoc", "ema.snapshot_every=2", "trainer.validate_every=4")  # validated once, at the end
PREFIXES = {"unet": "denoiser.", "transformer": "denoiser.", "text_encoder": "text_encoders.text_encoder."}  # T2IModule -> pipeline part


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sd15, images):
    from difftrain.engine.run import run_training

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("lora") / "run"
        run_training(t2i_config(run, "sd15", sd15, images, *LORA))  # 4 steps: snapshots at 2 and 4
    finally:
        torch.set_num_threads(threads)
    return run


def _combined(run, synthesis: dict) -> dict[str, torch.Tensor]:
    """sum_i w_i snapshot_i from the weights synthesis.json reports, computed here (float64)."""
    total: dict[str, torch.Tensor] = {}
    for name, w in synthesis["weights"].items():
        for key, t in load_file(str(run / "ema_snapshots" / name)).items():
            total[key] = total.get(key, torch.zeros(t.shape, dtype=torch.float64)) + w * t.double()
    return {k: v.float() for k, v in total.items()}


def _as_module_name(key: str, part: str) -> str:
    """T2IModule parameter name -> the adapter's key in peft's state dict of that pipeline part."""
    return key.removeprefix(PREFIXES[part]).replace(".default.", ".")


def test_lora_snapshots_are_the_trainable_adapters_only(lora_run):
    names = sorted(p.name for p in (lora_run / "ema_snapshots").iterdir())
    assert names == [f"step-{s:09d}.profile-{k}.safetensors" for s in (2, 4) for k in (0, 1)]
    trainable = set(load_file(str(lora_run / "checkpoints" / "checkpoint-4" / "model.safetensors")))
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)  # adapters, not the base
    assert {k.split(".")[0] for k in trainable} == {"denoiser", "text_encoders"}
    for name in names:
        snapshot = load_file(str(lora_run / "ema_snapshots" / name))
        assert set(snapshot) == trainable and all(v.dtype == torch.float32 for v in snapshot.values())
    ema = load_file(str(lora_run / "checkpoints" / "checkpoint-4" / "ema.safetensors"))
    assert set(ema) == trainable | {f"profile1/{k}" for k in trainable}


def test_ema_synth_writes_lora_files_that_load_with_load_lora_weights(lora_run, sd15, tmp_path):
    from diffusers import DiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    out = tmp_path / "synth"
    assert main(["ema-synth", str(lora_run), "--sigma-rel", "0.05,0.12", "--out", str(out)]) == 0
    # the tracked profile at the last snapshot is the run's EMA: the same LoRA file as final/
    tracked = out / "sigma_rel-0.0500-step-4"
    final = load_file(str(lora_run / "final" / "pytorch_lora_weights.safetensors"))
    same = load_file(str(tracked / "pytorch_lora_weights.safetensors"))
    assert same.keys() == final.keys() and all(torch.allclose(same[k], final[k], atol=1e-6) for k in final)

    folder = out / "sigma_rel-0.1200-step-4"
    assert {p.name for p in folder.iterdir()} >= {"pytorch_lora_weights.safetensors", "scheduler", "synthesis.json"}
    synthesis = json.loads((folder / "synthesis.json").read_text())
    assert len(synthesis["weights"]) == 4 and synthesis["fit_error"] < 0.5
    expected = _combined(lora_run, synthesis)
    tracked_last = load_file(str(lora_run / "ema_snapshots" / "step-000000004.profile-0.safetensors"))
    assert any(not torch.allclose(expected[k], tracked_last[k]) for k in expected)  # a profile of its own

    pipe = DiffusionPipeline.from_pretrained(str(sd15))
    pipe.load_lora_weights(str(folder))
    (adapter,) = pipe.unet.peft_config
    assert pipe.unet.peft_config[adapter].r == 4 and pipe.unet.peft_config[adapter].lora_alpha == 8
    compared = 0
    for part in ("unet", "text_encoder"):
        loaded = get_peft_model_state_dict(getattr(pipe, part), adapter_name=adapter)
        mine = {_as_module_name(k, part): v for k, v in expected.items() if k.startswith(PREFIXES[part])}
        assert loaded.keys() == mine.keys()
        for key, value in mine.items():  # float64 sums of the same terms in the same order, then float32
            torch.testing.assert_close(loaded[key], value, rtol=1e-6, atol=1e-7)
        compared += len(mine)
    assert compared == len(expected)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of a dog", num_inference_steps=2, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_ema_sweep_val_loss_on_a_lora_run(lora_run, tmp_path, capsys):
    """The 0.05 row is the run's own EMA at step 4: its validation loss is the run's val_loss_ema (same fixed
    batch, noise and timesteps; the weights differ from that snapshot by the ~1e-5 other synthesis weights)."""
    out = tmp_path / "sweep"
    assert main(["ema-sweep", str(lora_run), "--sigma-rel", "0.05:0.15:3", "--metric", "val_loss",
                 "--out", str(out)]) == 0
    result = json.loads((out / "ema_sweep.json").read_text())
    assert [round(r["sigma_rel"], 4) for r in result["rows"]] == [0.05, 0.1, 0.15]
    assert all(r["val_loss"] > 0 for r in result["rows"]) and result["best"] in result["rows"]
    logged = [json.loads(x) for x in (lora_run / "metrics.jsonl").read_text().splitlines()]
    val_loss_ema = next(r["val_loss_ema"] for r in logged if "val_loss_ema" in r)
    assert result["rows"][0]["val_loss"] == pytest.approx(val_loss_ema, rel=1e-4)
    assert (out / "sigma_rel-0.1500-step-4" / "pytorch_lora_weights.safetensors").is_file()
    capsys.readouterr()
    assert main(["ema-sweep", str(lora_run), "--sigma-rel", "0.1", "--metric", "accuracy"]) == 2
    assert "digits" in capsys.readouterr().err


def test_full_finetune_ema_synth_writes_the_exported_pipeline(tmp_path, sd15, images):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(t2i_config(run, "sd15", sd15, images, "ema=posthoc", "ema.snapshot_every=1", "trainer.max_steps=3",
                            "ema.snapshot_dtype=bf16"))
    trainable = set(load_file(str(run / "checkpoints" / "checkpoint-2" / "model.safetensors")))
    assert all(k.startswith("denoiser.") for k in trainable)  # the whole UNet, nothing frozen
    out = tmp_path / "synth"
    assert main(["ema-synth", str(run), "--sigma-rel", "0.08", "--out", str(out)]) == 0
    folder = out / "sigma_rel-0.0800-step-3"
    expected = _combined(run, json.loads((folder / "synthesis.json").read_text()))
    assert set(expected) == trainable
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    state = unet.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key.removeprefix("denoiser.")], value, rtol=1e-6, atol=1e-7)
    pipe = DiffusionPipeline.from_pretrained(str(folder))  # the family's export: a whole pipeline
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert json.loads((folder / "difftrain.json").read_text())["lora"] is False


def test_sd3_lora_bf16_ema_synth_loads_into_the_sd3_pipeline(tmp_path, images):
    """Another family through the same path (the family's export: SD3's peft-keyed LoRA file), bf16 frozen base."""
    from diffusers import DiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from difftrain.engine.run import run_training

    sd3 = pipeline_dir("sd3", tmp_path / "pipes")
    run = tmp_path / "run"
    run_training(t2i_config(run, "sd3", sd3, images, "lora=on", "lora.rank=2", "trainer.mixed_precision=bf16",
                            "optimizer.lr=0.01", "ema=posthoc", "ema.snapshot_every=1", "trainer.max_steps=2"))
    out = tmp_path / "synth"
    assert main(["ema-synth", str(run), "--sigma-rel", "0.2", "--out", str(out)]) == 0
    folder = out / "sigma_rel-0.2000-step-2"
    expected = _combined(run, json.loads((folder / "synthesis.json").read_text()))
    assert expected and all(k.startswith("denoiser.") and ".lora_" in k for k in expected)
    pipe = DiffusionPipeline.from_pretrained(str(sd3))
    pipe.load_lora_weights(str(folder))
    (adapter,) = pipe.transformer.peft_config
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    mine = {_as_module_name(k, "transformer"): v for k, v in expected.items()}
    assert loaded.keys() == mine.keys()
    for key, value in mine.items():
        torch.testing.assert_close(loaded[key], value, rtol=1e-6, atol=1e-7)
