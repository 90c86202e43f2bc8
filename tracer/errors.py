"""Errors a user can cause while loading or tracing, and the set the CLI reports as one line."""

from kvstore.errors import SnapshotError


class TracerError(Exception):
    """Bad input to the tracer (model spec, prompt, settings); the message is shown as is."""


class ModelLoadError(TracerError):
    """The model could not be found or loaded."""


class PromptError(TracerError):
    """The prompt is empty or does not fit the model's context window."""


class SettingsError(TracerError):
    """A sampling or trace setting the tracer cannot use (a negative temperature, top-p of 0, ...)."""


# Everything the command line turns into "kvtrace: error: <message>" and exit code 2.
UserError = (TracerError, SnapshotError, FileNotFoundError, IsADirectoryError, PermissionError)
