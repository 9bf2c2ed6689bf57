"""`difftrain` entry point: dispatch to a subcommand; user errors print one paragraph, exit non-zero."""

from __future__ import annotations

import os
import sys

USAGE = """usage: difftrain <command> [args]

commands:
  train [overrides]      train from the Hydra config (difftrain train --help lists groups and options)
  sample RUN_DIR         write a grid of samples from a finished run
  eval RUN_DIR           digits-classifier accuracy of a finished run's samples
  components             list every config group, its options and what each does
  report SWEEP_DIR       table, CSV and plots of a multirun sweep
"""


def print_error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False).print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)


def strip_local_rank(argv: list[str]) -> list[str]:
    """`deepspeed` and `torch.distributed.launch` append --local_rank=N (Hydra would reject it): move it
    into the LOCAL_RANK environment variable, which torchrun and accelerate set themselves."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        key = arg.split("=", 1)[0]
        if key in ("--local_rank", "--local-rank"):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            if value:
                os.environ.setdefault("LOCAL_RANK", value)
            continue
        out.append(arg)
        i += 1
    return out


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
        if command == "train":
            from difftrain.cli.train import train_command

            return train_command(rest)
        if command in ("components", "sample", "eval", "report"):
            from difftrain.cli import commands

            return getattr(commands, f"{command}_command")(rest)
    except UserError as exc:
        print_error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print_error("interrupted; the last complete checkpoint is kept (resume=latest continues)")
        return 130
    print_error(f"unknown command '{command}'; commands: train, sample, eval, components, report")
    return 2
