"""Text-to-image config validation and loading errors: exit 2, one clear paragraph, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_env
from tiny_pipes import one_thread, pipeline_dir, t2i_config, write_images

from difftrain.config.validate import ConfigError
from difftrain.errors import UserError

one_thread = pytest.fixture(autouse=True)(one_thread)


@pytest.fixture(scope="session")
def pipes(tmp_path_factory):
    return tmp_path_factory.mktemp("pipes")


@pytest.fixture(scope="session")
def sd15(pipes):
    return pipeline_dir("sd15", pipes)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("data") / "photos", n=4)


def _compose(*overrides: str) -> dict:
    from difftrain.cli.train import compose_config
    from difftrain.config.validate import validate

    return validate(compose_config(list(overrides)))


def test_text_to_image_options_validate_with_their_yaml(tmp_path, sd15, images):
    cfg = t2i_config(tmp_path, "sd15", sd15, images, "lora=on")
    assert cfg["lora"] == {"name": "on", "rank": 4, "alpha": None, "dropout": 0.0, "init": "gaussian",
                           "target_modules": None, "train_text_encoder": False,
                           "text_encoder_target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    assert cfg["data"]["cache_text_embeddings"] is None and cfg["data"]["cache_latents"] is None
    cfg = t2i_config(tmp_path, "sd3", sd15, images)  # validation does not open the folder's model_index.json
    assert cfg["model"]["max_sequence_length"] == 77 and cfg["scheduler"]["name"] == "sd3"
    hf = _compose("model=sd15", f"model.pretrained={sd15}", "data=hf", "data.dataset=some/dataset")
    assert hf["data"]["resolution"] == 512  # the model's native resolution is the data default
    sd3 = _compose("model=sd3", f"model.pretrained={sd15}", "data=imagefolder", f"data.path={images}")
    assert sd3["data"]["resolution"] == 1024
    assert sd3["scheduler"]["name"] == "sd3" and sd3["weighting_scheme"]["name"] == "logit_normal"  # model=sd3's
    assert _compose("data=imagefolder", f"data.path={images}")["data"]["resolution"] == 64  # unet2d: unchanged


@pytest.mark.parametrize("overrides,cached", [
    ([], True),                                            # null = auto: center crop (flips are both cached)
    (["data.random_flip=true"], True),
    (["data.center_crop=false"], False),                   # a random crop per epoch cannot be cached
    (["data.center_crop=false", "data.cache_latents=true"], True),  # asked for: one crop per sample
    (["data.cache_latents=false"], False),
    (["data=dreambooth", "data.instance_prompt=a sks dog", "data.class_prompt=a dog"], True),
    (["data=dreambooth", "data.instance_prompt=a sks dog", "data.class_prompt=a dog", "data.buckets=auto"], False),
])
def test_cache_latents_null_caches_when_the_crop_is_the_center_one(tmp_path, sd15, images, overrides, cached):
    from difftrain.config.schema_data import latents_cached
    from difftrain.engine.setup import cache_options

    data = [f"data.path={images}"] + ([f"data.class_data_dir={tmp_path / 'class'}"]
                                      if "data=dreambooth" in overrides else [])
    cfg = t2i_config(tmp_path, "sd15", sd15, None, *(overrides if "data=dreambooth" in overrides
                                                     else ["data=imagefolder", *overrides]), *data)
    assert latents_cached(cfg["data"]) is cached and cache_options(cfg, tmp_path).latents is cached


def test_cache_latents_null_is_nothing_for_digits():
    from difftrain.config.schema_data import latents_cached

    assert latents_cached(_compose()["data"]) is False


@pytest.mark.parametrize("overrides,expected", [
    (["model=sd3", "scheduler=ddpm"], "model=sd3 cannot train with scheduler=ddpm"),
    (["model=sd15", "scheduler=sd3"], "model=sd15 cannot train with scheduler=sd3"),
    (["model=sd15", "scheduler=ddpm", "lora=on", "lora.train_text_encoder=true", "data.cache_text_embeddings=true"],
     "lora.train_text_encoder=true trains the text encoders"),
    (["model=sd15", "model.pretrained=???"], "model.pretrained is required for model=sd15"),
    (["model=sd15", "model.pretrained=./no/such/folder"], "is not a folder"),
    (["model=sd15", "data.resolution=30"], "must be a multiple of 8"),
    (["model=sd15", "data=digits"], "use data=imagefolder"),
    (["model=sd15", "lora=on", "lora.target_modules=[]"], "lora.target_modules must name at least one module"),
    (["model=unet2d", "lora=on"], "lora=on needs a pretrained text-to-image model"),
    (["model=unet2d", "data.cache_latents=true"], "data.cache_latents applies to text-to-image models"),
    (["model=sd15", "lora=on", "lora.rank=0"], "lora.rank=0 must be >= 1"),
    (["model=sd15", "data.caption_dropout=1.5"], "data.caption_dropout=1.5 must be <= 1"),
])
def test_meaningless_combinations_are_rejected(tmp_path, sd15, images, overrides, expected):
    base = [] if "data=digits" in overrides else ["data=imagefolder", f"data.path={images}"]
    if "model=unet2d" not in overrides:
        base.append(f"model.pretrained={sd15}")
    with pytest.raises(ConfigError) as info:
        _compose(*base, *overrides)
    assert any(expected in e for e in info.value.errors), info.value.errors


def test_pipeline_folder_without_model_index_is_a_config_error(tmp_path, images):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no model_index.json"):
        _compose("model=sd15", f"model.pretrained={tmp_path / 'empty'}", "data=imagefolder", f"data.path={images}")


def test_broken_pipeline_folders_raise_one_paragraph(tmp_path, sd15):
    import shutil

    from difftrain import registry

    def build(path, name="sd15"):
        return registry.build("model", {"name": name, "pretrained": str(path), "revision": None, "variant": None,
                                        "resolution": 32})

    no_unet = tmp_path / "no_unet"
    shutil.copytree(sd15, no_unet)
    shutil.rmtree(no_unet / "unet")
    with pytest.raises(UserError, match="lists 'unet' in model_index.json but has no unet/ subfolder"):
        build(no_unet)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(sd15, corrupt)
    weights = corrupt / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(UserError, match=r"could not load the 'vae' component \(AutoencoderKL\)") as info:
        build(corrupt)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="is a StableDiffusionPipeline pipeline, but model=sd3"):
        registry.build("model", {"name": "sd3", "pretrained": str(sd15), "revision": None, "variant": None,
                                 "resolution": 32, "max_sequence_length": 8})


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed where a GPU is")
def test_fp16_without_gpu_is_a_clear_error(tmp_path, sd15, images):
    from difftrain.engine.run import run_training

    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        run_training(t2i_config(tmp_path / "run", "sd15", sd15, images, "trainer.mixed_precision=fp16"))


def test_captionless_images_name_the_files(tmp_path, sd15):
    from difftrain.engine.run import run_training

    data = write_images(tmp_path / "photos", n=4, captions="txt")
    (data / "img2.txt").unlink()
    with pytest.raises(UserError, match=r"1 of 4 images have no caption \(e.g. img2.png\)"):
        run_training(t2i_config(tmp_path / "run", "sd15", sd15, data))


def _cli(*args: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "difftrain", *args], env={**cli_env(), **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_lists_every_problem_and_exits_2(tmp_path, images):
    result = _cli("train", "model=sd3", "scheduler=ddpm", "lora=on", "lora.train_text_encoder=true", "data=imagefolder",
                  f"data.path={images}", "data.cache_text_embeddings=true", cwd=tmp_path)
    assert result.returncode == 2
    text = " ".join(result.stderr.split())
    for expected in ("model.pretrained is required for model=sd3", "model=sd3 cannot train with scheduler=ddpm",
                     "cannot be cached"):
        assert expected in text, text
    assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []


def test_cli_unreachable_hub_id_is_one_paragraph(tmp_path, images):
    result = _cli("train", "model=sd15", "model.pretrained=difftrain-tests/not-a-model", "data=imagefolder",
                  f"data.path={images}", "data.resolution=32", f"output_dir={tmp_path / 'run'}", "trainer.progress=false",
                  cwd=tmp_path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 2, result.stderr[-2000:]
    text = " ".join(result.stderr.split())
    assert ("model.pretrained='difftrain-tests/not-a-model' is a hub id, but the Hugging Face Hub cannot be reached "
            "(no network, or HF_HUB_OFFLINE=1) and it is not in the local Hugging Face cache") in text
    assert "Traceback" not in result.stderr + result.stdout
