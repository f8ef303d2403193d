"""Samplers over a plain ``eps_fn(x, t) -> eps`` callable, in numpy.

Every sampler is one class registered by name (see :mod:`.base`); this package imports
each of its modules, so a new module with a registered class is all a new sampler
needs. ``SAMPLERS`` lists the names, :func:`make_sampler` builds one, and :func:`sample`
is the loop (over :class:`runtime.run.Run`, the stepping core).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, Sampler, make_sampler, register, sampler_class, unregister
from .loop import EpsFn, sample
from .noise import ImageNoise, Noise, draw_noise

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

SAMPLERS: tuple[str, ...] = tuple(REGISTRY)

__all__ = ["REGISTRY", "SAMPLERS", "EpsFn", "ImageNoise", "Noise", "Sampler", "draw_noise",
           "make_sampler", "register", "sample", "sampler_class", "unregister"]
