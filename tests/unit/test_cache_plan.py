"""The feature cache's size and fit, from metadata alone (smolvla_ray/cache/build.py):
nothing is built, read or written."""

from __future__ import annotations

from pathlib import Path

from smolvla_ray.cache.build import feature_bytes_per_image, plan_cache
from smolvla_ray.policy.config import PolicyConfig

GIB = 1024**3


def test_smolvla_base_caches_245760_bytes_per_image() -> None:
    base = PolicyConfig.preset("base")
    assert feature_bytes_per_image(base, "float32") == 64 * 960 * 4 == 245_760
    assert feature_bytes_per_image(base, "bfloat16") == 122_880
    assert feature_bytes_per_image(PolicyConfig.preset("tiny"), "float32") == 16 * 128 * 4


def test_a_libero_sized_dataset_does_not_fit_the_default_bound(tmp_path: Path) -> None:
    # LIBERO-sized: about 270k frames, two cameras; data.cache_max_bytes at its 20 GiB default.
    base = PolicyConfig.preset("base")
    plan = plan_cache(
        base, frames=270_000, cameras=2, dtype="float32", max_bytes=20 * GIB, cache_dir=tmp_path
    )
    assert plan.total_bytes == 270_000 * 2 * 245_760 == 132_710_400_000
    assert plan.line() == (
        "270,000 frames x 2 camera(s) x 245,760 bytes (float32) = 132.7 GB, a full copy on "
        "every node"
    )
    assert plan.problem == "it exceeds data.cache_max_bytes=21.5 GB"
    half = plan_cache(
        base, frames=270_000, cameras=2, dtype="bfloat16", max_bytes=20 * GIB, cache_dir=tmp_path
    )
    assert half.total_bytes == 66_355_200_000 and half.problem is not None
    # A bound that allows it still needs the disk: the free bytes under data.cache_dir.
    roomy = plan_cache(
        base, frames=270_000, cameras=2, dtype="float32", max_bytes=10**15,
        cache_dir=tmp_path / "not" / "yet",
    )  # fmt: skip
    fits = roomy.total_bytes <= roomy.free_bytes
    assert (roomy.problem is None) == fits
    if not fits:
        assert (
            roomy.problem.startswith("it exceeds the ") and str(tmp_path / "not") in roomy.problem
        )
