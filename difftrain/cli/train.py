"""`difftrain train [overrides]`: the whole Hydra CLI, with every config checked before any compute.

Before Hydra runs, each job's config (every combination of a `-m` sweep) is composed with Hydra's
compose API and validated against the schemas, so a typo or bad value exits 2 in well under two
seconds with every problem listed, and nothing is written.
"""

from __future__ import annotations

import os
import sys
import time

CONFIG_MODULE = "difftrain.conf"
HYDRA_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion",
                    "-sc", "--resolve", "--package", "-p", "--version"}
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
    """Every job's override list (the cartesian product of discrete sweeps)."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    try:
        (batch,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
        return batch
    except HydraException:  # range/interval sweeps (Optuna): check the fixed part only
        return [[o.input_line for o in parsed if not o.is_sweep_override()]]


def compose_config(overrides: list[str]) -> dict:
    """Compose conf/train.yaml with overrides into a resolved plain dict (no `hydra` node)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def precheck(overrides: list[str], multirun: bool) -> None:
    """Compose and validate each job; raise ConfigError listing every problem of every job."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from difftrain.config.validate import ConfigError, validate

    user = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
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
            message = " ".join(str(exc).split()).split(" Config search path")[0]
            problems = [message.removeprefix("In 'train': ")]
        for problem in problems:
            failing.setdefault(problem, []).append(" ".join(job))
    errors = [msg if len(where) == len(jobs) else f"{msg} (in job: {'; '.join(where)})"
              for msg, where in failing.items()]
    if errors:
        raise ConfigError(errors)


def train_command(args: list[str]) -> int:
    from difftrain.config.validate import ConfigError

    overrides, multirun, info = _split(args)
    if multirun and not info and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from difftrain.cli.main import print_error

        print_error("a -m sweep cannot run inside a multi-process launch (every rank would run every job); "
                    "launch the sweep once, e.g. with hydra/launcher=submitit_slurm (docs/sweeps.md), or "
                    "launch each run separately with accelerate launch / torchrun")
        return 2
    if not info:
        try:
            precheck(overrides, multirun)
        except ConfigError as exc:
            from difftrain.cli.main import print_error

            print_error("invalid config:\n  - " + "\n  - ".join(exc.errors) +
                        "\n(difftrain train --help lists the groups and options; docs/configuration.md every key)")
            return 2
    from difftrain.cli import sweep

    sweep.LAST_SUMMARY.clear()
    sys.argv = ["difftrain train", *args]
    _hydra_main()
    return 1 if multirun and sweep.LAST_SUMMARY.get("failed") else 0  # a sweep with a failed job exits 1


def _task(cfg) -> dict | float | None:
    """One job. In a -m sweep a failing job never raises (Hydra would then skip the sweep's end and its
    summary): it writes failed.json and job.json into its folder and the sweep goes on. Under the Optuna
    sweeper the job returns the float `eval.objective`."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from difftrain.cli.main import print_error
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
        print_error(str(exc))
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
