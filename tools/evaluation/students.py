"""Distilled students against their teacher: FD, digit-IS and images/s per network call."""

from __future__ import annotations

from pathlib import Path

from .steps import WITHIN, compare, measure, timing_note

# The issue's bar at 4 calls: FD within WITHIN x the full chain's, digit-IS within this.
IS_WITHIN = 0.1
# The teacher at a student's calls: the best fast solver with the timesteps that suit
# it at 5-10 calls (quadratic) and at 1-2 (trailing; quadratic spends one call at t = 0),
# and the undistilled DDIM on the student's own timesteps.
BASELINES = (("dpmpp_2m", "quadratic"), ("dpmpp_2m", "trailing"), ("ddim", "trailing"))


def students_table(teacher, students: list, ev, n: int, seeds, batch_size: int,
                   samples_dir: Path | None, progress: bool = True,
                   timing_images: int = 0) -> dict:
    """Rows: the teacher's full ancestral chain (the reference), its DDIM at the steps the
    distillation started from, then per student (fewest calls last) the student with its
    own sampler and the teacher's BASELINES at the same number of calls."""
    T = teacher.record.num_timesteps

    def row(pipe, model, sampler, steps, spacing="linspace", prefix=""):
        r = measure(pipe, ev, n, seeds, sampler, steps, batch_size, samples_dir, progress,
                    timing_images, spacing, prefix)
        return {"model": model, **r}

    rows = [row(teacher, "teacher", "ddpm", T)]
    students = sorted(students, key=lambda p: -p.record.distilled["steps"])
    for start in sorted({p.record.distilled["from_steps"] for p in students}, reverse=True):
        rows.append(row(teacher, "teacher", "ddim", start, "trailing"))
    for pipe in students:
        own = pipe.record.defaults
        steps = pipe.record.distilled["steps"]
        rows.append(row(pipe, f"student ({Path(pipe.source).name})", own["sampler"], steps,
                        own["spacing"], prefix=f"student{steps}-"))
        rows += [row(teacher, "teacher", sampler, steps, spacing)
                 for sampler, spacing in BASELINES]
    compare(rows, rows[0])
    for r in rows:
        if "digit_is" in r:
            r["digit_is_diff"] = r["digit_is"] - rows[0]["digit_is"]
    return {"rows": rows, "full_steps": T, "seeds": list(seeds),
            "timing": timing_note(timing_images, n, batch_size),
            "targets": _targets(rows)}


def _targets(rows: list[dict]) -> list[str]:
    """Each student against the bar: FD within WITHIN x the full chain's, digit-IS within
    IS_WITHIN of it (stated for 4 calls, reported for every student)."""
    lines = []
    for r in rows:
        if not r["model"].startswith("student") or "fd_ratio" not in r:
            continue
        fd_ok = r["fd_ratio"] <= WITHIN
        is_ok = abs(r.get("digit_is_diff", 0.0)) <= IS_WITHIN
        lines.append(f"{r['steps']} calls: FD {r['fd_ratio']:.2f}x the full chain's "
                     f"({'met' if fd_ok else 'missed'}: <= {WITHIN}x), digit-IS "
                     f"{r.get('digit_is_diff', 0.0):+.2f} ({'met' if is_ok else 'missed'}: "
                     f"within {IS_WITHIN})")
    return lines
