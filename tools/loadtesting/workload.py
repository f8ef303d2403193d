"""The request mix: classes of requests, their weights, and how a request is drawn."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestClass:
    name: str
    weight: float
    sampler: str
    steps: int
    n: tuple[int, int]  # inclusive range
    path: str = "/v1/samples"  # where it is posted (an edit: /v1/edits/KIND)


WORKLOAD = (RequestClass("short", 0.85, "ddim", 20, (1, 4)),
            RequestClass("medium", 0.12, "ddpm", 100, (8, 8)),
            RequestClass("long", 0.03, "ddpm", 1000, (1, 1)))


def draw(rng: random.Random, scale: float,
         workload: tuple[RequestClass, ...] = WORKLOAD) -> tuple[RequestClass, dict]:
    cls = rng.choices(workload, weights=[c.weight for c in workload])[0]
    body = {"n": rng.randint(*cls.n), "seed": rng.randrange(2**31), "sampler": cls.sampler,
            "steps": max(1, round(cls.steps * scale)), "format": "png"}
    return cls, body


def draw_list(rng: random.Random, count: int, scale: float,
              workload: tuple[RequestClass, ...] = WORKLOAD) -> list[tuple[RequestClass, dict]]:
    """``count`` requests whose classes follow the workload's weights exactly (rounded,
    at least one of each), shuffled: their rate at saturation is the workload's capacity."""
    classes = [c for c in workload for _ in range(max(1, round(c.weight * count)))]
    rng.shuffle(classes)
    requests = []
    for cls in classes:
        _, body = draw(rng, scale, workload)
        body.update(n=rng.randint(*cls.n), sampler=cls.sampler,
                    steps=max(1, round(cls.steps * scale)))
        requests.append((cls, body))
    return requests
