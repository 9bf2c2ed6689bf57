"""Errors that are the user's to fix: the CLI prints them as one paragraph, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, files, checkpoints). Message says what and how to fix."""

    exit_code = 2
    is_error = True  # False: a planned stop (preemption) printed as a plain line, not as "error:"


def warn(message: str) -> None:
    """One warning line on stderr (for what the user should know but that does not stop the run)."""
    import sys

    print(f"difftrain: warning: {message}", file=sys.stderr, flush=True)


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""

    exit_code = 3
