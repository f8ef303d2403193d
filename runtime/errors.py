"""Errors the runtime raises. Each message is one line: what, where, how to fix."""

import numbers

# Far above any machine's cores; more threads only ask for memory and stacks they cannot get.
MAX_THREADS = 1024
# Seeds are non-negative 63-bit integers, so every file and client stores them as int64.
MAX_SEED = 2**63 - 1


class ModelFileError(ValueError):
    """A model file (ONNX or engine sidecar) is missing, malformed or inconsistent."""


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run here: a library, a GPU or a provider is missing."""


class NonFiniteError(FloatingPointError):
    """The network produced NaN or inf during sampling."""


class StudentSamplingWarning(UserWarning):
    """A distilled student is sampled otherwise than it was distilled for (another step
    count, sampler or spacing): allowed, but its images are worse than at its own."""


class Cancelled(Exception):
    """A sampling call was cancelled by its caller (a callback returned False, or a cancel
    token was set). Nothing is broken: the pipeline stays usable."""


class OptionError(ValueError):
    """A request's option or field is wrong: ``field`` names it. ``kind`` is "type" (not the
    option's type: a server answers 400) or "value" (out of range or not one of the
    choices: 422)."""

    def __init__(self, field: str, message: str, *, kind: str = "value"):
        super().__init__(message)
        self.field, self.kind = field, kind


class RequestIdInUse(ValueError):
    """A request named itself with the id of one still queued or running."""


class Overloaded(RuntimeError):
    """A batching scheduler refused a request at once. Retry later, or on another server."""


class QueueFull(Overloaded):
    """The scheduler's waiting queue is full: retry later."""


class ShuttingDown(Overloaded):
    """The scheduler is closing: retry on another server."""


def check_int(value, name: str, *, minimum: int = 1, maximum: int | None = None) -> None:
    """Raise ValueError unless ``value`` is an integer (not a bool) in [minimum, maximum]."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
            or (maximum is not None and value > maximum)):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if maximum is not None:
            what += f" no larger than {maximum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
