"""Held-out episodes by LeRobot's rule (`dataset.eval_split`): within each task, the last
ceil(n x split) of its n episodes, in episode order. Episodes are grouped by their whole task
list, so an episode that shows two tasks is its own group's member, not both."""

from __future__ import annotations

import math
from collections.abc import Sequence

from smolvla_ray.data.meta import DatasetMeta


def split_by_task(meta: DatasetMeta, episodes: Sequence[int], fraction: float) -> list[int]:
    """The held-out subset of `episodes` (in their order) for a `fraction` in (0, 1)."""
    if not 0 < fraction < 1:
        raise ValueError(f"eval split {fraction} must be between 0 and 1 (exclusive)")
    groups: dict[tuple[str, ...], list[int]] = {}
    for episode in episodes:
        groups.setdefault(tuple(meta.episodes[episode].tasks), []).append(episode)
    held: set[int] = set()
    for members in groups.values():
        ordered = sorted(members)
        held.update(ordered[len(ordered) - math.ceil(len(ordered) * fraction) :])
    return [e for e in episodes if e in held]
