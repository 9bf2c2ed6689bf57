"""Experiment trackers for real, without network: W&B offline (its .wandb file read back with wandb's own
protobuf records), MLflow with a local SQLite store (read back with MlflowClient), TensorBoard's events file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import tiny_config


def _wandb_records(path: Path):
    """The records of a .wandb file: LevelDB log framing (7-byte ":W&B" header, 32 KiB blocks, record
    chunks FULL/FIRST/MIDDLE/LAST) around wandb's own protobuf `Record` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, head = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, parts = head, b""
    while pos + head <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + head]) if left >= head else (0, 0, 0)
        if left < head or (kind == 0 and length == 0):
            pos += left
            continue
        chunk = data[pos + head:pos + head + length]
        pos += head + length
        parts = chunk if kind == 2 else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One tiny run with TensorBoard, W&B (offline) and MLflow (SQLite), validating at steps 2 and 4."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from difftrain.engine.run import run_training

    root = tmp_path_factory.mktemp("trackers")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(root))
    mp.chdir(root)  # MLflow's SQLite store keeps artifacts in ./mlruns (its default artifact root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = tiny_config(root / "run", "logging.report_to=[tensorboard,wandb,mlflow]", "trainer.validate_every=2",
                      f"logging.mlflow_tracking_uri='{uri}'", "logging.project=tiny", "ema=none")
    try:
        run_training(cfg)
    finally:
        mp.undo()
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    return root / "run", uri, cfg


def test_wandb_offline_run_holds_every_metric_and_the_config(tracked_run):
    from difftrain.engine.trackers import hyperparameters

    run_dir, _, cfg = tracked_run
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history: dict[int, dict] = {}
    config: dict = {}
    names = []
    for record in _wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = history.setdefault(record.history.step.num, {})
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            row.update({k: v for k, v in items.items() if not k.startswith("_")})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "run":
            names.append((record.run.project, record.run.display_name, record.run.run_id))
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert names[0] == ("tiny", "run", ids["wandb"])
    expected: dict[int, dict] = {}
    for line in _metrics(run_dir):
        expected.setdefault(line.pop("step"), {}).update({k: v for k, v in line.items() if v is not None})
    images = {step: {k: row.pop(k) for k in sorted(row) if k.startswith("samples/")} for step, row in history.items()
              if any(k.startswith("samples/") for k in row)}
    assert history == expected  # every scalar of metrics.jsonl at its step, nothing else
    assert sorted(images) == [2, 4]  # one wandb.Image grid per validation
    assert all(v["samples/_type"] == "images/separated" and v["samples/count"] == 1 for v in images.values())
    assert {k: v for k, v in config.items() if not k.startswith("_")} == hyperparameters(cfg)
    assert config["trainer.max_steps"] == 4
    assert config["validation.labels"] == "[0, 1]"
    assert config["logging.report_to"] == '["tensorboard", "wandb", "mlflow"]'


def test_mlflow_sqlite_store_holds_the_exact_metrics_params_and_grids(tracked_run):
    from mlflow.tracking import MlflowClient

    from difftrain.engine.trackers import hyperparameters

    run_dir, uri, cfg = tracked_run
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.info.run_id == json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    lines = _metrics(run_dir)
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert logged == [(line["step"], line[key]) for line in lines if line.get(key) is not None]
    params = client.get_run(run.info.run_id).data.params
    assert params == {k: str(v) for k, v in hyperparameters(cfg).items()}
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert artifacts == ["samples/step_000002.png", "samples/step_000004.png"]
    local = Path(client.download_artifacts(run.info.run_id, "samples/step_000004.png", str(run_dir.parent)))
    assert local.read_bytes() == (run_dir / "samples" / "step_000004.png").read_bytes()


def test_tensorboard_keeps_one_events_file_with_the_scalars_grids_and_config(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = tracked_run
    events = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("events.out.tfevents*"))
    assert len(events) == 1 and events[0].startswith("tensorboard/events.out.tfevents")
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert loss == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in _metrics(run_dir) if "loss" in m]
    assert [e.step for e in acc.Images("samples")] == [2, 4]
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_a_tracker_that_is_not_installed_is_a_user_error_before_anything_runs(tmp_path, monkeypatch):
    import importlib.util

    from difftrain.config.validate import ConfigError
    from difftrain.engine.run import run_training
    from difftrain.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    message = ("logging.report_to has 'wandb' but the wandb package is not installed; install it with pip install "
               "\"difftrain[wandb]\" (or remove 'wandb' from logging.report_to)")
    with pytest.raises(ConfigError) as info:
        tiny_config(tmp_path / "run", "logging.report_to=[wandb]")
    assert info.value.errors == [message]
    cfg = tiny_config(tmp_path / "run")  # validated before the package "disappeared": the run checks again
    cfg["logging"] = {**cfg["logging"], "report_to": ["wandb"]}
    with pytest.raises(UserError, match=r"^logging.report_to has 'wandb'"):
        run_training(cfg)
    assert not (tmp_path / "run").exists()  # nothing written
