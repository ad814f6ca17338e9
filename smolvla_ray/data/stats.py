"""Feature statistics as LeRobot stores them in `meta/stats.json` and per episode.

Vectors get per-dimension stats (shape [D]); images get per-channel stats of the [0, 1]
pixel values with shape [3, 1, 1], like LeRobot's `compute_episode_stats`. Each entry has
`min`, `max`, `mean`, `std`, `count` ([1]) and the quantiles `q01 q10 q50 q90 q99`, which
LeRobot's quantile normalization modes read.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

QUANTILES: tuple[float, ...] = (0.01, 0.10, 0.50, 0.90, 0.99)
Stats = dict[str, np.ndarray]


def _quantile_key(q: float) -> str:
    return f"q{round(q * 100):02d}"


def vector_stats(values: np.ndarray) -> Stats:
    """Stats of a [N] or [N, D] array over its first axis."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    stats: Stats = {
        "min": array.min(axis=0),
        "max": array.max(axis=0),
        "mean": array.mean(axis=0),
        "std": array.std(axis=0),
        "count": np.array([array.shape[0]]),
    }
    for q in QUANTILES:
        stats[_quantile_key(q)] = np.quantile(array, q, axis=0)
    return stats


def image_stats(frames: np.ndarray, *, max_samples: int = 100) -> Stats:
    """Per-channel stats of uint8 [N, H, W, 3] frames scaled to [0, 1], shape [3, 1, 1].

    Like LeRobot, at most `max_samples` evenly spaced frames are used (pixels are highly
    redundant); `count` is the number of frames sampled.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"image_stats expects uint8 [N, H, W, 3] frames, got {frames.shape}")
    step = max(1, int(np.ceil(len(frames) / max_samples)))
    sample = frames[::step]
    pixels = sample.reshape(-1, 3).astype(np.float64) / 255.0
    flat = vector_stats(pixels)
    stats = {k: v.reshape(3, 1, 1) for k, v in flat.items() if k != "count"}
    stats["count"] = np.array([len(sample)])
    return stats


def aggregate_stats(parts: Sequence[Stats]) -> Stats:
    """Combine per-episode stats into dataset stats (exact mean/std, weighted quantiles).

    The pooled variance is exact; quantiles are count-weighted means of the per-episode
    quantiles, the same approximation LeRobot's `aggregate_stats` makes.
    """
    if not parts:
        raise ValueError("aggregate_stats needs at least one set of stats")
    counts = np.array([float(p["count"][0]) for p in parts])
    weights = counts / counts.sum()

    def weighted(key: str) -> np.ndarray:
        return sum(w * p[key] for w, p in zip(weights, parts, strict=True))

    mean = weighted("mean")
    second = sum(
        w * (p["std"] ** 2 + (p["mean"] - mean) ** 2) for w, p in zip(weights, parts, strict=True)
    )
    out: Stats = {
        "min": np.min(np.stack([p["min"] for p in parts]), axis=0),
        "max": np.max(np.stack([p["max"] for p in parts]), axis=0),
        "mean": mean,
        "std": np.sqrt(np.maximum(second, 0.0)),
        "count": np.array([int(counts.sum())]),
    }
    for q in QUANTILES:
        key = _quantile_key(q)
        if all(key in p for p in parts):
            out[key] = weighted(key)
    return out


def to_jsonable(stats: dict[str, Stats]) -> dict[str, dict[str, list]]:
    """Stats as nested lists (the `stats.json` form)."""
    return {
        feature: {name: np.asarray(value).tolist() for name, value in entry.items()}
        for feature, entry in stats.items()
    }


def from_jsonable(raw: dict[str, dict[str, list]]) -> dict[str, Stats]:
    """Parse `stats.json` content into float32 arrays (count stays int64)."""
    out: dict[str, Stats] = {}
    for feature, entry in raw.items():
        if not isinstance(entry, dict):
            raise ValueError(
                f"stats entry {feature!r} must be an object, got {type(entry).__name__}"
            )
        out[feature] = {
            name: np.atleast_1d(
                np.asarray(value, dtype=np.int64 if name == "count" else np.float32)
            )
            for name, value in entry.items()
        }
    return out
