"""Errors that are the user's to fix: the CLI prints them as one paragraph, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, files, checkpoints). Message says what and how to fix."""

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""

    exit_code = 3
