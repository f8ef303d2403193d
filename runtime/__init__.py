"""Torch-free DDPM runtime: the noise schedule, the samplers and model-file backends.

Only numpy is imported here; ONNX Runtime, TensorRT and CUDA load when a model does.
"""

from .samplers import ImageNoise, sample
from .schedule import Schedule

__all__ = ["ImageNoise", "Schedule", "load", "sample"]


def load(path, **kwargs):
    """Load a model file (ONNX, or a TensorRT engine with its sidecar) as a sampling pipeline."""
    from .pipeline import load as _load

    return _load(path, **kwargs)
