"""What every CLI module prints to the user: one error paragraph, and the launcher argument it must drop.

A leaf module (rich only, imported lazily) so that cli/main.py, cli/train.py, cli/sweep.py and
cli/commands.py can all use it without importing each other.
"""

from __future__ import annotations

import os


def print_error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False).print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)


def print_stop(exc: BaseException) -> None:
    """A UserError as the user should read it: "error: ..." or, for a planned stop, a plain line."""
    if getattr(exc, "is_error", True):
        print_error(str(exc))
    else:
        import sys

        print(f"difftrain: {exc}", file=sys.stderr, flush=True)


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
