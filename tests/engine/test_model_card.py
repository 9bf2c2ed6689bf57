"""final/README.md: a Hugging Face model card (front matter read back with huggingface_hub's ModelCard) whose
diffusers snippet runs, for a digits UNet2D run and an SD 1.x LoRA run (licence carried from the base pipeline's
own README); final/samples.png is the last validation grid."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_config

sys.path.insert(0, str(REPO / "tests" / "t2i"))
from tiny_pipes import one_thread, pipeline_dir, t2i_config, write_images  # noqa: E402

one_thread = pytest.fixture(autouse=True)(one_thread)


def _card(run: Path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "final" / "README.md")
    (snippet,) = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    return card.data.to_dict(), card.text, snippet


def test_digits_card_and_its_snippet(tmp_path):
    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(tiny_config(run, "trainer.max_steps=2"))
    data, text, snippet = _card(run)
    assert data == {"library_name": "diffusers", "pipeline_tag": "unconditional-image-generation",
                    "tags": ["diffusers", "diffusers-training", "difftrain", "unet2d",
                             "unconditional-image-generation"]}
    assert (run / "final" / "samples.png").read_bytes() == (run / "samples" / "step_000002.png").read_bytes()
    assert "| steps | 2 |" in text and "| batch size | 8 per process x 1 accumulation |" in text
    assert "![validation samples](samples.png)" in text
    scope: dict = {}
    exec(snippet, scope)  # the snippet loads final/ from its folder and samples 4 class-conditional images
    assert scope["images"].shape == (4, 1, 8, 8) and torch.isfinite(scope["images"]).all()


def test_sd15_lora_card_carries_the_base_license_and_its_snippet_runs(tmp_path, monkeypatch):
    from difftrain.engine.run import run_training

    base = tmp_path / "base"
    shutil.copytree(pipeline_dir("sd15", tmp_path / "pipes"), base)
    (base / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags: [x]\n---\n# base\n")
    run = tmp_path / "run"
    run_training(t2i_config(run, "sd15", base, write_images(tmp_path / "photos"), "lora=on", "lora.rank=4",
                            "lora.alpha=8", "data.instance_prompt=a photo of sks dog", "trainer.max_steps=2",
                            "export.lora_formats=[diffusers,kohya]", "hub.repo_id=org/sks-dog"))
    data, text, snippet = _card(run)
    assert data == {
        "base_model": str(base), "library_name": "diffusers", "license": "creativeml-openrail-m",
        "pipeline_tag": "text-to-image",
        "tags": ["diffusers", "diffusers-training", "difftrain", "sd15", "stable-diffusion", "lora",
                 "template:sd-lora", "text-to-image"],
        "instance_prompt": "a photo of sks dog",
        "widget": [{"text": "a photo of a dog", "output": {"url": "samples.png"}}]}
    assert "- LoRA: rank 4, alpha 8.0 (scale 2) on the family's default modules" in text
    assert "- Trigger words (instance prompt): `a photo of sks dog`" in text
    assert "`lora_kohya.safetensors`: the same LoRA in the kohya layout" in text
    assert 'pipe.load_lora_weights("org/sks-dog", weight_name="pytorch_lora_weights.safetensors")' in snippet
    # the snippet as written, on the CPU in float32 and from the run's folder instead of the Hub
    local = (snippet.replace('"org/sks-dog"', f'"{run / "final"}"').replace('.to("cuda")', "")
             .replace("torch.bfloat16", "torch.float32").replace('pipe("a photo of a dog")',
                                                                 'pipe("a photo of a dog", num_inference_steps=2, '
                                                                 'height=32, width=32)'))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(local, scope)
    assert type(scope["pipe"].scheduler).__name__ == "DDIMScheduler" and (tmp_path / "image.png").is_file()
    assert scope["pipe"].unet.peft_config  # the LoRA was loaded
