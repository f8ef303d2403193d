"""What both verifiers return: a model file checked against a reference on the same inputs.

``export/onnx_export.py`` checks an ONNX file against the torch network (relative
tolerance); ``export/trt_build.py`` checks a TensorRT engine against ONNX Runtime
(absolute tolerance on unit-scale ε, since reduced precision loses absolute bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Verification:
    max_abs: float      # max |file - reference| over all checked outputs
    max_rel: float      # max_abs relative to the reference's scale
    tolerance: float
    batch_sizes: tuple[int, ...]
    scale: float = 0.0  # max |reference|: a zero output would make the comparison vacuous
    # False: pass when max_rel <= tolerance. True: pass when max_abs <= tolerance *
    # max(1, scale), an absolute bound for outputs of unit scale such as ε.
    absolute: bool = False

    @property
    def ok(self) -> bool:
        if self.absolute:
            return math.isfinite(self.max_abs) and \
                self.max_abs <= self.tolerance * max(1.0, self.scale)
        return math.isfinite(self.max_rel) and self.max_rel <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        kind = "absolute " if self.absolute else ""
        return (f"verification {verdict}: max abs diff {self.max_abs:.3e}, max rel diff "
                f"{self.max_rel:.3e} ({kind}tolerance {self.tolerance:.0e}), batch sizes "
                f"{list(self.batch_sizes)}")
