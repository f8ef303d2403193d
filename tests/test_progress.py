"""The training progress bar: its rate (and so its ETA) ignores the session's first step."""

from __future__ import annotations

import io
import time

from tqdm import tqdm

from training.progress import StepBar


def test_rate_leaves_out_the_first_step_and_counts_pauses():
    out = io.StringIO()
    bar = StepBar(total=100, file=out, mininterval=0)
    plain = tqdm(total=100, file=io.StringIO(), mininterval=0)
    # Both bars see the same slow first step, then five steps of 20 ms.
    time.sleep(0.6)
    bar.update(1)
    plain.update(1)
    for _ in range(5):
        time.sleep(0.02)
        bar.update(1)
        plain.update(1)
    rate = bar.format_dict["rate"]
    assert rate <= 1 / 0.02 * 1.01  # sleeps only ever run long
    assert rate > 1 / 0.08  # the steady rate, with a 4x margin for a busy machine
    assert plain.format_dict["rate"] < rate  # tqdm's own average still feels the first step
    # A pause (a checkpoint, a preview) is amortised into the rate, so the ETA includes it.
    time.sleep(0.3)
    bar.update(1)
    assert bar.format_dict["rate"] < 6 / 0.3
    bar.close()
    plain.close()
    assert "/100" in out.getvalue()  # it drew


def test_a_disabled_bar_updates_silently(capsys):
    bar = StepBar(total=3, disable=True)  # --no-progress, and every rank but the first
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert capsys.readouterr() == ("", "")
