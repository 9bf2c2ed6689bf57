"""Experiment trackers through accelerate's tracker API: every `logging.report_to` entry is one of accelerate's
tracker classes (`accelerate.tracking.LOGGER_TYPE_TO_CLASS`), built with the run's project, run name and folder.

Rank 0 only. Every tracker gets the scalars that go to metrics.jsonl, the validation grids (`log_images` where
the tracker has it; MLflow: the PNG as an artifact under samples/) and the resolved config as hyperparameters
(one flat dict of scalars). TensorBoard keeps its layout: one events file in RUN_DIR/tensorboard/, the config
as a text summary (not add_hparams, which writes a second events file). A resumed run continues its tracker
runs: the W&B run id and the MLflow run id are kept in RUN_DIR/trackers.json, and TensorBoard drops the events
the interrupted run wrote after the resumed step (purge_step).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from difftrain.config.schema import TRACKERS
from difftrain.engine.run_files import route_library_logs
from difftrain.errors import UserError

IDS_FILE = "trackers.json"


def check_trackers(logging_cfg: dict) -> None:
    """The config rule, again at run start (run_training may be called without the CLI): a UserError."""
    from difftrain.config.rules import trackers_known_and_installed

    problems = trackers_known_and_installed({"logging": logging_cfg})
    if problems:
        raise UserError("; ".join(problems))


def hyperparameters(cfg: dict) -> dict:
    """The resolved config as one flat dict of str/int/float/bool (lists as JSON text, None as "null")."""
    out: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            elif isinstance(value, (list, tuple)):
                out[name] = json.dumps(value)
            elif value is None:
                out[name] = "null"
            else:
                out[name] = value

    walk(cfg, "")
    return out


def _tensorboard_class():
    from accelerate.tracking import TensorBoardTracker

    class TensorBoard(TensorBoardTracker):
        """accelerate's TensorBoard tracker with the config as one text summary in the same events file."""

        def store_init_configuration(self, values: dict) -> None:
            rows = "\n".join(f"| {k} | {v} |" for k, v in values.items())
            self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, global_step=0)
            self.writer.flush()

    return TensorBoard


class Trackers:
    """The run's trackers (an empty list off rank 0 or with `logging.report_to: []`)."""

    def __init__(self, cfg: dict, run_dir: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.trackers: list = []
        if not enabled or not cfg["logging"]["report_to"]:
            return
        options = cfg["logging"]
        check_trackers(options)
        ids_path = run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        run_name = options["run_name"] or run_dir.name
        for name in options["report_to"]:  # imported first, so that their loggers print into train.log
            importlib.import_module(TRACKERS[name])
        route_library_logs()
        for name in options["report_to"]:
            tracker = self._build(name, options, run_name, run_dir, ids, resume_step)
            tracker.start()
            self.trackers.append(tracker)
        if "wandb" in options["report_to"]:  # W&B is silent (settings below): one line of ours instead
            run = self.get("wandb").tracker
            ids["wandb"] = run.id
            where = f"offline; upload it with: wandb sync {Path(run.dir).parent}" if run.offline else run.url
            print(f"difftrain: W&B run {run.name}: {where}", flush=True)
        if "mlflow" in options["report_to"]:
            ids["mlflow"] = self.get("mlflow").tracker.info.run_id
        if ids:
            ids_path.write_text(json.dumps(ids, indent=2))
        if resume_step is None:  # a new run: the config once (a resumed one continues the same tracker runs)
            params = hyperparameters(cfg)
            for tracker in self.trackers:
                tracker.store_init_configuration(params)

    @staticmethod
    def _build(name: str, options: dict, run_name: str, run_dir: Path, ids: dict, resume_step: int | None):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        project = options["project"]
        if name == "tensorboard":  # RUN_DIR/tensorboard/events.out.tfevents.*
            return _tensorboard_class()("tensorboard", run_dir, purge_step=resume_step)
        if name == "wandb":
            import wandb

            return LOGGER_TYPE_TO_CLASS["wandb"](project, name=run_name, dir=str(run_dir), id=ids.get("wandb"),
                                                 resume="allow", settings=wandb.Settings(silent=True))
        if name == "mlflow":
            import mlflow

            uri = options["mlflow_tracking_uri"] or os.environ.get("MLFLOW_TRACKING_URI")
            if uri:
                mlflow.set_tracking_uri(uri)
            return LOGGER_TYPE_TO_CLASS["mlflow"](experiment_name=project, run_name=run_name,
                                                  run_id=ids.get("mlflow"))
        if name == "aim":
            return LOGGER_TYPE_TO_CLASS["aim"](run_name, logging_dir=str(run_dir))
        if name == "dvclive":
            return LOGGER_TYPE_TO_CLASS["dvclive"](run_name, dir=str(run_dir / "dvclive"), resume=resume_step
                                                   is not None)
        if name == "clearml":
            return LOGGER_TYPE_TO_CLASS["clearml"](run_name, project_name=project, task_name=run_name)
        return LOGGER_TYPE_TO_CLASS[name](project)  # comet_ml: the project; the run is comet's experiment

    def get(self, name: str):
        return next(t for t in self.trackers if t.name == name)

    def log(self, step: int, values: dict) -> None:
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not scalars:
            return
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def image(self, tag: str, png_path: Path, step: int) -> None:
        if not self.trackers:
            return
        import numpy as np
        from PIL import Image

        with Image.open(png_path) as im:
            pixels = np.asarray(im.convert("RGB"))
        for tracker in self.trackers:
            if tracker.name == "mlflow":  # MLflow has no log_images: the PNG as an artifact of the run
                tracker.log_artifact(str(png_path), artifact_path=tag)
            elif tracker.name == "tensorboard":
                tracker.log_images({tag: pixels[None]}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({tag: [pixels]}, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
