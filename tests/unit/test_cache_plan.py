"""The feature cache's size and fit, from metadata alone (smolvla_ray/cache/build.py):
nothing is built, read or written."""

from __future__ import annotations

from pathlib import Path

from smolvla_ray.cache.build import CachePlan, combine_plans, feature_bytes_per_image, plan_cache
from smolvla_ray.policy.config import PolicyConfig

GIB = 1024**3


def test_smolvla_base_caches_245760_bytes_per_image() -> None:
    base = PolicyConfig.preset("base")
    assert feature_bytes_per_image(base, "float32") == 64 * 960 * 4 == 245_760
    assert feature_bytes_per_image(base, "bfloat16") == 122_880
    assert feature_bytes_per_image(PolicyConfig.preset("tiny"), "float32") == 16 * 128 * 4


def test_a_libero_sized_dataset_does_not_fit_the_default_bound(tmp_path: Path) -> None:
    # LIBERO-sized: about 270k frames (here 1,000 episodes of 270), two cameras;
    # data.cache_max_bytes at its 20 GiB default.
    base = PolicyConfig.preset("base")
    plan = plan_cache(
        base, episode_frames=[270] * 1000, cameras=2, dtype="float32", max_bytes=20 * GIB,
        cache_dir=tmp_path,
    )  # fmt: skip
    assert plan.total_bytes == 270_000 * 2 * 245_760 == 132_710_400_000
    assert plan.line() == "270,000 frames x 2 camera(s) x 245,760 bytes (float32) = 132.7 GB"
    assert plan.problem == "it exceeds data.cache_max_bytes=21.5 GB"
    half = plan_cache(
        base, episode_frames=[270] * 1000, cameras=2, dtype="bfloat16", max_bytes=20 * GIB,
        cache_dir=tmp_path,
    )  # fmt: skip
    assert half.total_bytes == 66_355_200_000 and half.problem is not None
    # A bound that allows it still needs the disk: the free bytes under data.cache_dir.
    roomy = plan_cache(
        base, episode_frames=[270] * 1000, cameras=2, dtype="float32", max_bytes=10**15,
        cache_dir=tmp_path / "not" / "yet",
    )  # fmt: skip
    fits = roomy.total_bytes <= roomy.free_bytes
    assert (roomy.problem is None) == fits
    if not fits:
        assert (
            roomy.problem.startswith("it exceeds the ") and str(tmp_path / "not") in roomy.problem
        )


def plan(frames: list[int], max_bytes: float, free_bytes: float) -> CachePlan:
    """A plan of 10 kB images, one camera (1 MB per 100 frames), `free_bytes` free."""
    return CachePlan(
        frames=sum(frames), episodes=len(frames), longest_episode=max(frames), cameras=1,
        bytes_per_image=10_000, dtype="float32", max_bytes=int(max_bytes),
        free_bytes=int(free_bytes), cache_dir="/node/cache",
    )  # fmt: skip


def test_over_its_bound_a_cache_trains_through_the_lru_copy_at_a_stated_cost() -> None:
    # 4 episodes of 100 frames: 4 MB in all, 1 MB per shard, a 2 MB bound.
    over = plan([100] * 4, max_bytes=2e6, free_bytes=1e12)
    assert over.problem == "it exceeds data.cache_max_bytes=2.0 MB"
    assert over.bounded_problem is None  # `on` trains from it, through the LRU copy
    # Shuffled reads hit a copy holding half the cache half the time; a miss downloads its
    # episode's shard (1 MB) again: 400 reads x 50% x 1 MB per epoch.
    assert over.bounded_cost() == (
        "every node keeps at most data.cache_max_bytes=2.0 MB of it and downloads evicted "
        "episode shards again when read: about 50% of the reads, ~1.0 MB each, ~0.2 GB per "
        "epoch, which can be slower than decoding video"
    )


def test_on_is_refused_only_when_the_bounded_copy_cannot_work() -> None:
    # One shard (the longest episode's, 1.5 MB) larger than the bound: nothing can hold it.
    assert plan([100, 150], max_bytes=1.2e6, free_bytes=1e12).bounded_problem == (
        "one episode's shard (1.5 MB) exceeds data.cache_max_bytes=1.2 MB: raise "
        "data.cache_max_bytes above it"
    )
    # A bound larger than the free disk: the node's copy would fill the disk.
    assert plan([100] * 4, max_bytes=3e6, free_bytes=2.5e6).bounded_problem == (
        "a node's copy of up to 3.0 MB exceeds the 2.5 MB free under /node/cache: free disk "
        "there, or lower data.cache_max_bytes to at most 2.5 MB"
    )
    # Within the bound but not the disk: the copy is the whole cache.
    assert "copy of up to 4.0 MB" in plan([100] * 4, 1e7, 2.5e6).bounded_problem
    assert plan([100] * 4, max_bytes=3e6, free_bytes=3e6).bounded_problem is None


def test_a_mixture_is_sized_and_bounded_over_all_its_datasets_caches() -> None:
    # Two datasets' caches of 2 MB and 1.5 MB (largest shards 1 MB and 1.5 MB): each fits a
    # 3 MB bound alone, not together; the largest shard is the larger one's.
    mixed = combine_plans({"a": plan([100, 100], 3e6, 1e12), "b": plan([150], 3e6, 1e12)})
    assert mixed.total_bytes == 3_500_000 and mixed.largest_shard_bytes == 1_500_000
    assert (mixed.frames, mixed.episodes) == (350, 3)
    assert mixed.problem == "it exceeds data.cache_max_bytes=3.0 MB"
    assert mixed.bounded_problem is None
    assert mixed.line() == (
        "dataset a: 200 frames x 1 camera(s) x 10,000 bytes (float32) = 2.0 MB; dataset b: "
        "150 frames x 1 camera(s) x 10,000 bytes (float32) = 1.5 MB; 3.5 MB in all"
    )
