"""`difftrain` entry point: dispatch to a subcommand; user errors print one paragraph, exit non-zero."""

from __future__ import annotations

import sys

from difftrain.cli.console import (  # the leaf module every cli module imports
    print_error,
    print_stop,
    strip_local_rank,
)

USAGE = """usage: difftrain <command> [args]

commands:
  train [overrides]      train from the Hydra config (difftrain train --help lists groups and options)
  sample RUN_DIR         write a grid of samples from a finished run
  eval RUN_DIR           digits-classifier accuracy of a finished run's samples
  components             list every config group, its options and what each does
  report RUN_DIR|SWEEP_DIR  report.html of a run; for a sweep also table, CSV, plots
  verify RUN_DIR         check every checkpoint and cache of a run against its checksums
  data-report [overrides]  buckets, counts, held-out and bad images of the data (also: train --dry-run)
  ema-synth RUN_DIR      post-hoc EMA: models of any --sigma-rel from an ema=posthoc run's snapshots
  ema-sweep RUN_DIR      post-hoc EMA: evaluate a range of --sigma-rel, CSV + plot, the best one
  push RUN_DIR --repo-id org/name  upload a finished run's final/ (model card included) to the Hugging Face Hub
"""


def _complete(argv: list[str]) -> int:
    """Hydra tab completion for `difftrain train ...`: drop the subcommand word, then ask Hydra."""
    import os
    import re

    from difftrain.cli.train import train_command

    line = os.environ.get("COMP_LINE", "")
    os.environ["COMP_LINE"] = re.sub(r"^(\s*\S+)\s+train(\s|$)", r"\1\2", line)
    return train_command(argv)


def main(argv: list[str] | None = None) -> int:
    argv = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("-sc", "--shell-completion"):  # the completion script calls `difftrain -sc query=...`
        return _complete(argv)
    from difftrain.errors import UserError

    try:
        if command == "data-report" or (command == "train" and "--dry-run" in rest):
            from difftrain.cli.data_report import data_report_command

            return data_report_command(rest)
        if command == "verify":
            from difftrain.cli.verify import verify_command

            return verify_command(rest)
        if command == "train":
            from difftrain.cli.train import train_command

            return train_command(rest)
        if command in ("ema-synth", "ema-sweep"):
            from difftrain.cli import posthoc

            return getattr(posthoc, f"{command.replace('-', '_')}_command")(rest)
        if command == "push":
            from difftrain.cli.push import push_command

            return push_command(rest)
        if command in ("components", "sample", "eval", "report"):
            from difftrain.cli import commands

            return getattr(commands, f"{command}_command")(rest)
    except UserError as exc:
        print_stop(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print_error("interrupted; the last complete checkpoint is kept (resume=latest continues)")
        return 130
    print_error(f"unknown command '{command}'; commands: train, sample, eval, components, report, data-report, verify, "
                "ema-synth, ema-sweep, push")
    return 2
