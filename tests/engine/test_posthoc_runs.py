"""ema=posthoc in a real tiny digits run: snapshots, exact resume, ema-synth and ema-sweep from the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from difftrain.cli.main import main
from difftrain.engine import checkpoint as ckpt

POSTHOC = ("ema=posthoc", "ema.snapshot_every=2", "trainer.max_steps=5", "trainer.checkpoints_total_limit=null")


def _snapshots(run):
    """name -> (metadata, tensors as raw bytes): bitwise content (safetensors orders the metadata keys of a
    file arbitrarily, so whole files are not byte-identical)."""
    from safetensors import safe_open

    found = {}
    for path in sorted((run / "ema_snapshots").iterdir()):
        with safe_open(str(path), framework="pt") as f:
            found[path.name] = (f.metadata(), {k: f.get_tensor(k).view(-1).view(torch.uint8).numpy().tobytes()
                                               for k in f.keys()})  # noqa: SIM118
    return found


def test_posthoc_run_snapshots_resumes_bitwise_and_synthesises(tmp_path, capsys, monkeypatch):
    from diffusers import UNet2DModel

    from difftrain.engine.run import run_training

    full = tmp_path / "full"
    run_training(tiny_config(full, *POSTHOC))
    names = sorted(_snapshots(full))
    assert names == [f"step-{s:09d}.profile-{k}.safetensors" for s in (2, 4, 5) for k in (0, 1)]
    meta = json.loads((full / "checkpoints" / "checkpoint-4" / "ema.json").read_text())
    assert meta["optimization_step"] == 4 and meta["sigma_rels"] == [0.05, 0.1]

    part = tmp_path / "part"  # interrupted after checkpoint 2; its later snapshots (one damaged) are left behind
    shutil.copytree(full, part)
    shutil.rmtree(part / "final")
    for step, path in ckpt.complete_checkpoints(part / "checkpoints"):
        if step > 2:
            shutil.rmtree(path)
    (part / "ema_snapshots" / names[-1]).write_bytes(b"partial")
    run_training(tiny_config(part, *POSTHOC, "resume=latest"))
    assert _snapshots(part) == _snapshots(full)
    a = load_file(str(full / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(part / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "synth"
    assert main(["ema-synth", str(full), "--sigma-rel", "0.05,0.12", "--out", str(out)]) == 0
    folder = out / "sigma_rel-0.0500-step-5"
    synthesis = json.loads((folder / "synthesis.json").read_text())
    assert synthesis["fit_error"] < 1e-6  # the tracked profile at a snapshot time: that snapshot
    assert synthesis["weights"]["step-000000005.profile-0.safetensors"] == pytest.approx(1.0, abs=1e-4)
    model = UNet2DModel.from_pretrained(folder / "unet")
    snap = load_file(str(full / "ema_snapshots" / "step-000000005.profile-0.safetensors"))
    state = model.state_dict()
    assert all(torch.allclose(state[k], v, atol=1e-5) for k, v in snap.items())
    # the first profile is the run's EMA: final/unet holds it
    assert all(torch.equal(a[k], snap[k]) for k in snap)
    assert UNet2DModel.from_pretrained(out / "sigma_rel-0.1200-step-5" / "unet") is not None

    sweep = tmp_path / "sweep"
    assert main(["ema-sweep", str(full), "--sigma-rel", "0.05:0.15:3", "--metric", "val_loss",
                 "--out", str(sweep)]) == 0
    rows = (sweep / "ema_sweep.csv").read_text().splitlines()
    assert rows[0].startswith("sigma_rel,gamma,step,val_loss") and len(rows) == 4
    assert json.loads((sweep / "ema_sweep.json").read_text())["best"]["sigma_rel"] in (0.05, 0.1, 0.15)

    # difftrain verify checks the snapshots too: all fine, then one with flipped bits is named
    assert main(["verify", str(full)]) == 0
    victim = sorted((full / "ema_snapshots").glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-8] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "250")  # a rich table one row per line
    assert main(["verify", str(full)]) == 1
    assert victim.name in capsys.readouterr().out


def test_ema_synth_user_errors(tmp_path, capsys):
    from difftrain.engine.run import run_training

    run = tmp_path / "run"
    run_training(tiny_config(run, "trainer.max_steps=2"))  # ema=ema: no snapshots
    assert main(["ema-synth", str(run), "--sigma-rel", "0.1"]) == 2
    assert "ema=posthoc" in capsys.readouterr().err
    assert main(["ema-synth", str(run), "--sigma-rel", "0.5"]) == 2
    assert "--sigma-rel" in capsys.readouterr().err


def test_posthoc_has_no_offload(tmp_path):
    """ema=posthoc keeps its fp32 profiles beside the weights: `ema.offload` (ema=ema's) is refused by the key
    check, with the keys it does have (docs/ema.md)."""
    from hydra.errors import ConfigCompositionException

    from difftrain.config.validate import ConfigError

    with pytest.raises(ConfigError, match=r"ema\.offload is not a key of ema; allowed keys: name, sigma_rels"):
        tiny_config(tmp_path, "ema=posthoc", "+ema.offload=true")
    with pytest.raises(ConfigCompositionException, match="ema.offload"):
        tiny_config(tmp_path, "ema=posthoc", "ema.offload=true")
