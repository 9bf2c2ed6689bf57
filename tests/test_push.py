"""`difftrain push` and `hub.push_on_finish`: everything up to huggingface_hub's create_repo + upload_folder (the
HfApi methods are replaced by recorders), and the clear errors without network, without a token, with a bad
repo id or without final/ (exit 2, nothing uploaded)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, tiny_config

FINAL_FILES = {"README.md", "samples.png", "scheduler/scheduler_config.json", "unet/config.json",
               "unet/diffusion_pytorch_model.safetensors", "unet_raw/config.json",
               "unet_raw/diffusion_pytorch_model.safetensors"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from difftrain.engine.run import run_training

    run = tmp_path_factory.mktemp("push") / "run"
    run_training(tiny_config(run, "trainer.max_steps=2"))
    return run


@pytest.fixture
def hub(monkeypatch):
    """Recorders in place of HfApi.create_repo / upload_folder, and a Hub that answers."""
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        calls.append(("upload_folder", kwargs, files, (folder / "README.md").read_text(), self.token))
        return "https://huggingface.co/org/name/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr("difftrain.families.loading.hub_reachable", lambda: True)
    return calls


def test_push_uploads_final_with_create_repo_and_upload_folder(finished, hub, capsys):
    from difftrain.cli.main import main

    assert main(["push", str(finished), "--repo-id", "org/name", "--private", "--token", "hf_test"]) == 0
    (create, upload) = hub
    assert create == ("create_repo", "org/name", {"private": True, "exist_ok": True, "repo_type": "model"})
    _, kwargs, files, readme, token = upload
    assert kwargs == {"repo_id": "org/name", "folder_path": str(finished / "final"),
                      "commit_message": "difftrain: unet2d model from run run", "repo_type": "model"}
    assert files == FINAL_FILES and token == "hf_test"
    assert 'UNet2DModel.from_pretrained("org/name", subfolder="unet")' in readme  # the card names the repo
    assert "pushed" in capsys.readouterr().out


def test_push_defaults_to_the_runs_hub_section(tmp_path, finished, hub):
    from difftrain.cli.main import main

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("repo_id: null", "repo_id: team/digits"))
    assert main(["push", str(run), "--token", "hf_test"]) == 0
    assert hub[0] == ("create_repo", "team/digits", {"private": False, "exist_ok": True, "repo_type": "model"})


@pytest.mark.parametrize("args,message", [
    (["--repo-id", "bad id!"], "'bad id!' is not a Hugging Face repo id"),
    (["--repo-id", "a/b/c"], "'a/b/c' is not a Hugging Face repo id"),
    ([], "no repository given: pass --repo-id org/name"),
])
def test_a_bad_repo_id_fails_before_any_network_call(finished, hub, args, message, capsys):
    from difftrain.cli.main import main

    assert main(["push", str(finished), *args, "--token", "hf_test"]) == 2
    assert hub == [] and message in capsys.readouterr().err


def test_a_run_without_final_and_a_missing_token_are_clear_errors(tmp_path, finished, hub, monkeypatch, capsys):
    import huggingface_hub

    from difftrain.cli.main import main

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(finished / "config.yaml", unfinished / "config.yaml")
    assert main(["push", str(unfinished), "--repo-id", "org/name", "--token", "hf_test"]) == 2
    assert "has no final/ folder: the run has not finished" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(finished), "--repo-id", "org/name"]) == 2
    assert "no Hugging Face token: log in with `hf auth login`" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "nowhere"), "--repo-id", "org/name"]) == 2
    assert hub == []


def test_an_unreachable_hub_fails_fast_and_clearly(finished):
    before = (finished / "final" / "README.md").read_text()
    env = {**cli_env(), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "difftrain", "push", str(finished), "--repo-id", "org/name"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - started < 20  # the process start included; the probe itself is immediate
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the Hugging Face Hub (http://127.0.0.1:9) cannot be reached" in result.stderr
    assert (finished / "final" / "README.md").read_text() == before  # nothing changed


def test_push_on_finish_uploads_at_the_end_of_the_run(tmp_path, hub, monkeypatch):
    from difftrain.engine.run import run_training

    monkeypatch.setenv("HF_TOKEN", "hf_env")
    run = tmp_path / "run"
    run_training(tiny_config(run, "trainer.max_steps=2", "hub.push_on_finish=true", "hub.repo_id=org/name",
                             "hub.private=true"))
    (create, upload) = hub
    assert create[1:] == ("org/name", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert upload[2] == FINAL_FILES and upload[4] == "hf_env"
    assert (run / "summary.json").is_file()


def test_push_on_finish_without_network_warns_and_the_run_succeeds(tmp_path, hub, monkeypatch, capsys):
    from difftrain.engine.run import run_training

    monkeypatch.setattr("difftrain.families.loading.hub_reachable", lambda: False)
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    run = tmp_path / "run"
    run_training(tiny_config(run, "trainer.max_steps=2", "hub.push_on_finish=true", "hub.repo_id=org/name"))
    err = capsys.readouterr().err
    assert "hub.push_on_finish: the Hugging Face Hub" in err and f"difftrain push {run} --repo-id org/name" in err
    assert hub == [] and (run / "summary.json").is_file() and (run / "final" / "README.md").is_file()
