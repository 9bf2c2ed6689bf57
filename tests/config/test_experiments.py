"""The shipped presets (conf/experiment/, `+experiment=NAME`): each one composes with placeholder paths and
validates with no error (as torchtune tests every shipped config), the files are exactly the documented ones,
one preset's values are checked key by key, the required paths stay required, the command line wins,
`smoke` trains end to end, and a wrong name is one exit-2 sentence listing the presets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import cli_env

from difftrain import registry
from difftrain.cli.train import compose_config, experiment_presets, precheck
from difftrain.config.rules import check_rules
from difftrain.config.validate import ConfigError, validate

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "conf" / "experiment"
SHIPPED = ["dreambooth_lora", "flux_lora_1024", "sd15_full_512", "sd15_lora_512", "sd3_lora_1024", "sdxl_lora_1024",
           "smoke"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    (root / "pipe").mkdir()
    (root / "pipe" / "model_index.json").write_text("{}")  # validation only checks that it is there
    (root / "images").mkdir()
    return {"pipe": str(root / "pipe"), "images": str(root / "images"), "class": str(root / "class_images")}


def with_paths(name: str, paths: dict) -> list[str]:
    """The overrides a user gives a preset: the paths (and DreamBooth's prompts and class folder)."""
    if name == "smoke":
        return [f"+experiment={name}"]
    extra = ["data.instance_prompt=a photo of sks dog", "data.class_prompt=a photo of a dog",
             f"data.class_data_dir={paths['class']}"] if name == "dreambooth_lora" else []
    return [f"+experiment={name}", f"model.pretrained={paths['pipe']}", f"data.path={paths['images']}", *extra]


def test_the_shipped_presets_are_exactly_the_documented_ones():
    assert sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")) == SHIPPED
    assert sorted(p.name for p in EXPERIMENTS.iterdir()) == [f"{name}.yaml" for name in SHIPPED]
    assert list(experiment_presets()) == SHIPPED
    ecosystem = (REPO / "docs" / "ecosystem.md").read_text().split("\n## Presets\n", 1)[1].split("\n## ", 1)[0]
    assert sorted(re.findall(r"^\| `(\w+)` \|", ecosystem, flags=re.M)) == SHIPPED
    reference = (REPO / "docs" / "configuration.md").read_text().split("\n## Experiment presets\n", 1)[1]
    assert re.findall(r"^\| `(\w+)` \|", reference, flags=re.M) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_each_preset_is_a_global_package_of_group_overrides_with_a_description(name):
    text = (EXPERIMENTS / f"{name}.yaml").read_text()
    first, second = text.splitlines()[:2]
    assert first == "# @package _global_"
    assert second.startswith("# ") and experiment_presets()[name] == second[2:]
    node = yaml.safe_load(text)
    overrides = [d for d in node["defaults"]]
    assert overrides and all(isinstance(d, dict) and len(d) == 1 for d in overrides)
    for (key, option), in (d.items() for d in overrides):
        group = key.removeprefix("override /")
        assert key == f"override /{group}" and option in registry.names(group), (key, option)
    assert set(node) - {"defaults"} <= {"model", "data", "lora", "ema", "optimizer", "lr_scheduler", "trainer",
                                        "validation", "eval", "logging"}


@pytest.mark.parametrize("name", SHIPPED)
def test_each_preset_composes_and_validates_with_no_error(name, paths):
    checked = validate(compose_config(with_paths(name, paths)))  # raises ConfigError listing any problem
    assert check_rules(checked) == []
    if name != "smoke":
        assert checked["model"]["pretrained"] == paths["pipe"] and checked["data"]["path"] == paths["images"]


def test_sdxl_lora_1024_composes_to_exactly_these_values(paths):
    cfg = validate(compose_config(with_paths("sdxl_lora_1024", paths)))
    assert {k: cfg["model"][k] for k in ("name", "pretrained", "resolution", "vae", "vae_dtype")} == \
        {"name": "sdxl", "pretrained": paths["pipe"], "resolution": 1024, "vae": None, "vae_dtype": "fp32"}
    assert cfg["lora"] == {"name": "on", "rank": 16, "alpha": 16.0, "dropout": 0.0, "init": "gaussian",
                           "target_modules": None, "train_text_encoder": False,
                           "text_encoder_target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    assert {k: cfg["data"][k] for k in ("name", "path", "resolution", "buckets", "random_flip", "center_crop",
                                        "cache_latents", "cache_text_embeddings")} == \
        {"name": "imagefolder", "path": paths["images"], "resolution": 1024, "buckets": "auto", "random_flip": True,
         "center_crop": True, "cache_latents": True, "cache_text_embeddings": None}
    assert cfg["optimizer"] == {"name": "adamw", "lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.01, "eps": 1e-8}
    assert cfg["lr_scheduler"] == {"name": "constant_with_warmup", "warmup_steps": 0}
    assert (cfg["ema"], cfg["scheduler"]["name"], cfg["scheduler"]["prediction_type"]) == \
        ({"name": "none"}, "ddpm", "epsilon")
    assert {k: cfg["trainer"][k] for k in ("max_steps", "batch_size", "grad_accum", "mixed_precision",
                                           "gradient_checkpointing", "checkpoint_every", "validate_every")} == \
        {"max_steps": 2000, "batch_size": 1, "grad_accum": 4, "mixed_precision": "bf16", "gradient_checkpointing": True,
         "checkpoint_every": 500, "validate_every": 250}


def test_model_specific_groups_follow_the_preset_model(paths):
    sd3 = validate(compose_config(with_paths("sd3_lora_1024", paths)))
    flux = validate(compose_config(with_paths("flux_lora_1024", paths)))
    dreambooth = validate(compose_config(with_paths("dreambooth_lora", paths)))
    assert (sd3["scheduler"]["name"], sd3["weighting_scheme"]["name"]) == ("sd3", "logit_normal")
    assert (flux["scheduler"]["name"], flux["weighting_scheme"]["name"]) == ("sd3", "uniform")
    assert {k: dreambooth["data"][k] for k in ("name", "with_prior_preservation", "num_class_images",
                                               "prior_loss_weight", "resolution", "buckets")} == \
        {"name": "dreambooth", "with_prior_preservation": True, "num_class_images": 100, "prior_loss_weight": 1.0,
         "resolution": 512, "buckets": "none"}
    assert (dreambooth["lora"]["rank"], dreambooth["lora"]["alpha"], dreambooth["trainer"]["max_steps"]) == (4, 4.0, 500)


def test_the_command_line_wins_over_the_preset(paths):
    cfg = validate(compose_config([*with_paths("sd15_lora_512", paths), "ema=ema", "optimizer=sgd", "lora.rank=8",
                                   "data.resolution=640", "trainer.max_steps=100"]))
    assert (cfg["ema"]["name"], cfg["optimizer"]["name"], cfg["lora"]["rank"], cfg["lora"]["alpha"]) == \
        ("ema", "sgd", 8, 16.0)
    assert (cfg["data"]["resolution"], cfg["trainer"]["max_steps"], cfg["model"]["name"]) == (640, 100, "sd15")


def test_required_paths_stay_required_with_the_rules_own_messages():
    with pytest.raises(ConfigError) as info:
        precheck(["+experiment=sdxl_lora_1024"], multirun=False)
    assert info.value.errors == [
        "model.pretrained is required for model=sdxl: add model.pretrained=<hub id or local pipeline folder>, "
        "e.g. model.pretrained=stabilityai/stable-diffusion-xl-base-1.0",
        "data.path is required for data=imagefolder: add data.path=/path/to/images"]
    with pytest.raises(ConfigError) as info:
        precheck(["+experiment=dreambooth_lora", "model.pretrained=org/name", f"data.path={REPO}"], multirun=False)
    assert info.value.errors == [
        "data.with_prior_preservation=true needs data.class_prompt (e.g. 'a photo of a dog')",
        "data.with_prior_preservation=true needs data.class_data_dir (e.g. ./class_images/dog)"]


def test_wrong_spellings_of_a_preset_get_one_sentence():
    presets = ", ".join(SHIPPED)
    for overrides, message in [
        (["experiment=smoke"], "a preset is added with a plus: +experiment=NAME (not experiment=NAME); shipped "
                               f"presets: {presets}"),
        (["+experiment=smoke", "+experiment=sd15_lora_512"],
         "one +experiment=NAME per run: a preset sets whole groups, so two would fight over them")]:
        with pytest.raises(ConfigError) as info:
            precheck(overrides, multirun=False)
        assert info.value.errors == [message]


def test_an_unknown_preset_exits_2_listing_the_shipped_ones(tmp_path):
    result = subprocess.run([sys.executable, "-m", "difftrain", "train", "+experiment=sdxl_lora"], env=cli_env(),
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "error: invalid config:\n  - unknown experiment preset 'sdxl_lora'; shipped presets: " + ", ".join(SHIPPED) +
        " (difftrain components lists them, docs/ecosystem.md#presets describes them)\n"
        "(difftrain train --help lists the groups and options; docs/configuration.md every key)\n")
    assert list(tmp_path.iterdir()) == []


def test_hydra_main_composes_what_the_precheck_validated(tmp_path, paths):
    overrides = with_paths("sdxl_lora_1024", paths)
    result = subprocess.run([sys.executable, "-m", "difftrain", "train", *overrides, "--cfg", "job", "--resolve"],
                            env=cli_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == compose_config(overrides)
    assert list(tmp_path.iterdir()) == []


def test_components_lists_the_presets(capsys):
    from difftrain.cli.commands import components_command

    assert components_command(["experiment"]) == 0
    out = capsys.readouterr().out
    assert "experiment presets" in out and "ema_warmup" not in out  # only the presets table
    for name, description in experiment_presets().items():
        row = next(line for line in out.splitlines() if f" {name} " in line)
        assert description.split(" (")[0] in row, (name, row)
    assert components_command([]) == 0
    everything = capsys.readouterr().out
    assert "ema_warmup" in everything and all(name in everything for name in SHIPPED)


def test_smoke_trains_end_to_end_and_writes_final(tmp_path):
    from difftrain.engine.run import run_training

    cfg = validate(compose_config(["+experiment=smoke", f"output_dir={tmp_path / 'run'}"]))
    summary = run_training(cfg)
    run = tmp_path / "run"
    assert summary["steps"] == 20 and summary["run_dir"] == str(run)
    assert (run / "final" / "unet" / "config.json").is_file() and (run / "final" / "README.md").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-20"]
    assert not (run / "eval.json").exists() and summary["val_loss"] is not None  # validated once, not evaluated
