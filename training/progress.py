"""The training progress bar: a rate and ETA that hold from the first steps of a session."""

from __future__ import annotations

from tqdm import tqdm


class StepBar(tqdm):
    """tqdm whose rate (and so its ETA) is the mean over whole loop iterations after the first.

    tqdm's own rate is an exponential average of recent updates: the first step of a session
    (one-time kernel set-up) and each preview grid throw it off for a minute. Here the first
    step is left out and every later second counts, checkpoints and previews included, so the
    ETA is the remaining steps at the session's steady cost, amortised pauses and all.
    """

    def update(self, n: int = 1) -> bool | None:
        if self.disable:
            return super().update(n)
        now = self._time()
        if getattr(self, "_since", None) is None:
            self._since, self._steps_since = now, 0  # the end of the session's first step
        else:
            self._steps_since += n
        return super().update(n)

    @property
    def format_dict(self):
        d = super().format_dict
        steps = getattr(self, "_steps_since", 0)
        if steps:
            d["rate"] = steps / max(self._time() - self._since, 1e-9)
        return d
