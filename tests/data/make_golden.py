"""Write golden_samples.npz: images of every sampler drawn by the runtime before the
architecture change of the options schema and the stepping core (run once, on that code).

The network is a fixed numpy function of (x, t) made of float32 multiplies and adds only,
which round the same on every CPU, so the images depend on the runtime's own math alone.
tests/test_golden.py draws them again with today's code and compares bit for bit.
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runtime.metadata import ModelRecord  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.schedule import Schedule  # noqa: E402

# (name, data_range, n, seed, first_index, options)
CASES = [
    ("ddpm_full", (-1.0, 1.0), 3, 7, 0, dict(sampler="ddpm")),
    ("ddpm_small_50", (-1.0, 1.0), 3, 7, 2, dict(sampler="ddpm", steps=50,
                                                  variance="fixedsmall")),
    ("ddpm_01_range_20", (0.0, 1.0), 2, 3, 0, dict(sampler="ddpm", steps=20)),
    ("ddim_20", (-1.0, 1.0), 3, 11, 0, dict(sampler="ddim", steps=20)),
    ("ddim_eta_quadratic_20", (-1.0, 1.0), 3, 11, 0, dict(sampler="ddim", steps=20, eta=0.5,
                                                          spacing="quadratic")),
    ("dpmpp_2m_10", (-1.0, 1.0), 3, 5, 0, dict(sampler="dpmpp_2m", steps=10,
                                               spacing="quadratic")),
    ("dpmpp_3m_12", (-1.0, 1.0), 3, 5, 0, dict(sampler="dpmpp_3m", steps=12,
                                               spacing="trailing")),
    ("unipc_10", (-1.0, 1.0), 3, 5, 1, dict(sampler="unipc", steps=10, spacing="leading")),
    ("unipc_5", (-1.0, 1.0), 2, 9, 0, dict(sampler="unipc", steps=5)),
]


def eps_fn(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Float32 multiplies and adds only: the same bits on every CPU."""
    tt = t.astype(np.float32).reshape(-1, 1, 1, 1)
    return (np.float32(0.3) * x + np.float32(2e-4) * tt - np.float32(0.1)).astype(np.float32)


def record(data_range) -> ModelRecord:
    return ModelRecord(schedule=Schedule.linear(1000).config, image_shape=(1, 8, 8),
                       data_range=data_range, num_levels=17, model_config={},
                       checkpoint_sha256="0" * 64, weights="ema")


def main() -> None:
    arrays = {}
    for name, data_range, n, seed, first, options in CASES:
        pipe = Pipeline(eps_fn, record(data_range), source="golden", backend_name="numpy")
        arrays[name] = pipe.sample_float(n, seed, first_index=first, progress=False, **options)
    cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("flags")][0]
    meta = {"numpy": np.__version__, "avx512f": "avx512f" in cpu.split(),
            "cases": [[c[0], list(c[1]), *c[2:]] for c in CASES]}
    out = Path(__file__).with_name("golden_samples.npz")
    np.savez_compressed(out, meta=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
