"""`difftrain train [overrides]`: the whole Hydra CLI, with every config checked before any compute.

Before Hydra runs, each job's config (every combination of a `-m` sweep) is composed with Hydra's
compose API and validated against the schemas, so a typo or bad value exits 2 in well under two
seconds with every problem listed, and nothing is written. A sweep's folder is resolved once here and
handed to Hydra, and the exit status (1 when a job failed) is read from the `sweep_summary.json` that the
SweepSummary callback (cli/sweep.py) writes there.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import time
from pathlib import Path

CONFIG_MODULE = "difftrain.conf"
HYDRA_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion",
                    "-sc", "--resolve", "--package", "-p", "--version"}
JOB_NAME = "train"  # hydra.job.name of a `difftrain train` job (hydra.main names it after this module)
HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}


def _split(args: list[str]) -> tuple[list[str], bool, bool]:
    """(overrides, multirun, informational) from the raw arguments."""
    overrides, multirun, info = [], False, False
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg.split("=")[0] in HYDRA_INFO_FLAGS:
            info = True
            skip = arg in HYDRA_VALUE_FLAGS and arg not in ("--info", "-i")
        elif arg in HYDRA_VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, multirun, info


def _job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Every job's override list: the cartesian product of the discrete sweeps (`a=1,2`, `range(...)`), in
    the order Hydra's basic sweeper runs them, through Hydra's public override parser. Interval sweeps
    (`interval(...)`, Optuna's search space) cannot be enumerated: their keys keep the config's value here."""
    if not multirun:
        return [overrides]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices: dict[str, list[str]] = {}  # key -> its values as overrides; a later override of a key wins
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if override.is_interval_sweep():
            choices.pop(key, None)
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            choices[key] = [override.input_line]
    return [list(job) for job in itertools.product(*choices.values())]


def compose_config(overrides: list[str]) -> dict:
    """Compose conf/train.yaml with overrides into a resolved plain dict (no `hydra` node)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def resolve_sweep_dir(overrides: list[str]) -> str | None:
    """The folder a `-m` sweep with these overrides will use (`hydra.sweep.dir`, its `${now:...}` resolved
    now), or None when it cannot be worked out before Hydra runs (then the sweep keeps Hydra's own)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    try:
        first_job = _job_overrides([o for o in overrides if not _is_hydra(o)], multirun=True)[0]
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3", job_name=JOB_NAME):
            cfg = compose(config_name="train", overrides=[*first_job, *filter(_is_hydra, overrides)],
                          return_hydra_config=True)
        sweep_dir = str(OmegaConf.select(cfg, "hydra.sweep.dir"))
    except Exception:  # e.g. a launcher plugin that is not installed: Hydra reports it when it runs
        return None
    return sweep_dir if "'" not in sweep_dir and not sweep_dir.endswith("\\") else None


def _is_hydra(override: str) -> bool:
    return override.lstrip("+~").startswith("hydra")


def precheck(overrides: list[str], multirun: bool) -> None:
    """Compose and validate each job; raise ConfigError listing every problem of every job."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from difftrain import registry
    from difftrain.config.validate import ConfigError, validate

    user = [o for o in overrides if not _is_hydra(o)]
    try:
        jobs = _job_overrides(user, multirun)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError([f"could not parse the overrides: {exc}"]) from None
    failing: dict[str, list[str]] = {}  # message -> the jobs it occurs in
    for job in jobs:
        try:
            validate(compose_config(job))
            problems = []
        except ConfigError as exc:
            problems = exc.errors
        except (HydraException, OmegaConfBaseException) as exc:
            message = " ".join(str(exc).split()).split(" Config search path")[0].removeprefix("In 'train': ")
            renamed = re.search(r"Could not find '(\w+)/(\w+)'", message)
            if renamed and renamed.group(2) in registry.RENAMED:
                message += f" (renamed: use {renamed.group(1)}={registry.RENAMED[renamed.group(2)]})"
            problems = [_experiment_message(message) or message]
        for problem in problems:
            failing.setdefault(problem, []).append(" ".join(job))
    errors = [msg if len(where) == len(jobs) else f"{msg} (in job: {'; '.join(where)})"
              for msg, where in failing.items()]
    if errors:
        raise ConfigError(errors)


def experiment_presets() -> dict[str, str]:
    """name -> what it is (the comment under `# @package _global_`) of every shipped conf/experiment/ preset."""
    from importlib.resources import files

    presets = {}
    for path in (files(CONFIG_MODULE) / "experiment").iterdir():
        if path.name.endswith(".yaml"):
            comments = [line for line in path.read_text().splitlines()[1:] if line.startswith("# ")]
            presets[path.name.removesuffix(".yaml")] = comments[0][2:] if comments else ""
    return dict(sorted(presets.items()))


def _experiment_message(message: str) -> str | None:
    """Hydra's errors about `+experiment=NAME` as one sentence naming the shipped presets."""
    shipped = ", ".join(experiment_presets())
    unknown = re.match(r"Could not find 'experiment/([^']*)'", message)
    if unknown:
        return (f"unknown experiment preset '{unknown.group(1)}'; shipped presets: {shipped} "
                "(difftrain components lists them, docs/ecosystem.md#presets describes them)")
    if message.startswith("Could not override 'experiment'"):
        return f"a preset is added with a plus: +experiment=NAME (not experiment=NAME); shipped presets: {shipped}"
    if message.startswith("Multiple values for experiment"):
        return "one +experiment=NAME per run: a preset sets whole groups, so two would fight over them"
    return None


def train_command(args: list[str]) -> int:
    from difftrain.cli.console import print_error
    from difftrain.config.validate import ConfigError

    overrides, multirun, info = _split(args)
    if multirun and not info and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print_error("a -m sweep cannot run inside a multi-process launch (every rank would run every job); "
                    "launch the sweep once, e.g. with hydra/launcher=submitit_slurm (docs/sweeps.md), or "
                    "launch each run separately with accelerate launch / torchrun")
        return 2
    if not info:
        try:
            precheck(overrides, multirun)
        except ConfigError as exc:
            print_error("invalid config:\n  - " + "\n  - ".join(exc.errors) +
                        "\n(difftrain train --help lists the groups and options; docs/configuration.md every key)")
            return 2
    sweep_dir = resolve_sweep_dir(overrides) if multirun and not info else None
    pin = [f"hydra.sweep.dir='{sweep_dir}'"] if sweep_dir else []  # Hydra uses the folder we read below
    sys.argv = ["difftrain train", *args, *pin]
    started = time.time()
    _hydra_main()
    if sweep_dir is None:
        return 0
    from difftrain.cli.sweep import failed_jobs

    return 1 if failed_jobs(Path(sweep_dir), since=started) else 0  # a sweep with a failed job exits 1


def _task(cfg) -> dict | float | None:
    """One job. In a -m sweep a failing job never raises (Hydra would then skip the sweep's end and its
    summary): it writes failed.json and job.json into its folder and the sweep goes on. Under the Optuna
    sweeper the job returns the float `eval.objective`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from difftrain.cli.console import print_error, print_stop
    from difftrain.cli.sweep import job_result, write_job_record
    from difftrain.config.validate import ConfigError, validate
    from difftrain.errors import UserError

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    started = time.time()
    checked: dict = {}
    try:
        checked = validate(OmegaConf.to_container(cfg, resolve=True))
        if multirun and not checked["output_dir"]:
            checked["output_dir"] = hydra_cfg.runtime.output_dir
        from difftrain.engine.distributed import reset_accelerate_state
        from difftrain.engine.run import run_training

        if multirun:
            reset_accelerate_state()  # jobs run one after another in one process (basic/joblib launchers)
        summary = run_training(checked)
    except (UserError, ConfigError) as exc:
        code = getattr(exc, "exit_code", 2)
        print_stop(exc)
        if not multirun:
            sys.exit(code)
        return write_job_record(hydra_cfg, started, error=str(exc), exit_code=code)
    except Exception as exc:  # a crash of one sweep job must not lose the others' results
        if not multirun:
            raise
        import traceback

        print_error(f"job {hydra_cfg.job.num} failed: {exc!r}")
        return write_job_record(hydra_cfg, started, error=f"{type(exc).__name__}: {exc}", exit_code=1,
                                trace=traceback.format_exc())
    _print_summary(summary)
    if multirun:
        write_job_record(hydra_cfg, started, summary=summary)
    return job_result(hydra_cfg, summary, checked["eval"]["objective"])


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from difftrain.engine.run import is_main_process

    if not is_main_process():
        return
    table = Table(title="difftrain run", show_header=False)
    table.add_row("run folder", summary["run_dir"])
    table.add_row("steps", str(summary["steps"]))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    for key in ("loss", "val_loss", "val_loss_ema"):
        if summary.get(key) is not None:
            table.add_row(key, f"{summary[key]:.5f}")
    if "eval" in summary:
        table.add_row("digits accuracy", f"{summary['eval']['accuracy']:.1%} "
                      f"({summary['eval']['samples']} class-conditional samples)")
    Console().print(table)


def _hydra_main() -> None:
    import hydra

    hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="train")(_task)()
