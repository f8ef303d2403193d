"""Errors the runtime raises. Each message is one line: what, where, how to fix."""


class ModelFileError(ValueError):
    """A model file (ONNX or engine sidecar) is missing, malformed or inconsistent."""


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run here: a library, a GPU or a provider is missing."""


class NonFiniteError(FloatingPointError):
    """The network produced NaN or inf during sampling."""
