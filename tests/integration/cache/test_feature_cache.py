"""The frozen-feature cache on the loopback S3 server: training from it equals training from
video (the trainer in-process, the cache built by Ray tasks as `driver.run` builds it); the
key follows weights, preprocessing and data; builds resume; misuse fails clearly."""

from __future__ import annotations

import tempfile
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file

from smolvla_ray.build import open_dataset, resolve_dataset_features
from smolvla_ray.cache.build import ensure_feature_cache
from smolvla_ray.cache.store import CacheStore, FeatureShards, cache_key, key_inputs
from smolvla_ray.checkpoint.discovery import fetch_checkpoint, list_checkpoints
from smolvla_ray.run_layout import run_uri
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import SpecError, spec_from_dict
from smolvla_ray.train.metrics import read_metrics
from tests.inprocess import record_episodes, recorded, train_in_process
from tests.integration.conftest import tiny_spec_dict

# The cache is built by Ray tasks: on the session's private Ray, never one ray.remote() would
# start or find by itself.
pytestmark = pytest.mark.usefixtures("ray_local")


def spec_for(dataset, storage, name, mode, options, **extra):
    data = {"uri": dataset, "num_loader_workers": 0, "feature_cache": mode, **extra.pop("data", {})}
    train = {"steps": 3, "log_every": 1, **extra.pop("train", {})}
    scaling = {"num_workers": 1, **extra.pop("scaling", {})}
    return spec_from_dict(
        tiny_spec_dict(
            dataset, storage, name, data=data, storage_options=options, train=train,
            scaling=scaling, **extra,
        )
    )  # fmt: skip


def final_trainable(storage: str, name: str, options: dict) -> dict[str, torch.Tensor]:
    info = list_checkpoints(run_uri(storage, name), options)[-1]
    with tempfile.TemporaryDirectory() as tmp:
        return load_file(
            str(fetch_checkpoint(info.uri, Path(tmp), options) / "trainable.safetensors")
        )


def test_training_from_cache_equals_training_from_video(
    demo_dataset: str, s3_server, s3_bucket: str
) -> None:
    storage, options = s3_server.url(s3_bucket, "runs"), s3_server.storage_options
    cached_spec = spec_for(demo_dataset, storage, "cached", "on", options)
    train_in_process(cached_spec, feature_cache=ensure_feature_cache(cached_spec, options))
    train_in_process(spec_for(demo_dataset, storage, "video", "off", options))
    fs, root = fsspec.core.url_to_fs(f"{storage}/feature-cache", **options)
    (cache_dir,) = fs.ls(root)
    assert len([p for p in fs.ls(cache_dir) if p.endswith(".safetensors")]) == 4
    cached = read_metrics(run_uri(storage, "cached"), options)
    video = read_metrics(run_uri(storage, "video"), options)
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in video], rel=1e-6)
    a, b = final_trainable(storage, "cached", options), final_trainable(storage, "video", options)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_key_follows_weights_preprocessing_and_data(demo_dataset: str, tmp_path: Path) -> None:
    from smolvla_ray.data.synthetic import write_demo_dataset

    def key(**changes) -> str:
        dataset = changes.pop("dataset", demo_dataset)
        settings = RunSettings.from_spec(
            spec_for(dataset, str(tmp_path), "k", "auto", {}, **changes)
        )
        meta = open_dataset(settings, storage_options={})
        config, resolution = resolve_dataset_features(settings, meta, storage_options={})
        return cache_key(key_inputs(settings, config, resolution, meta, storage_options={}))

    base = key()
    assert key() == base  # deterministic
    assert key(train={"steps": 3, "seed": 7}) != base  # other random-init weights
    assert (
        key(policy={"preset": "tiny", "overrides": {"resize_imgs_with_padding": [32, 32]}}) != base
    )
    assert key(data={"feature_cache_dtype": "bfloat16"}) != base
    other = write_demo_dataset(str(tmp_path / "other"), num_episodes=4, episode_length=40, seed=1)
    assert key(dataset=other) != base


def test_interrupted_build_resumes_with_its_shards(
    demo_dataset: str, tmp_path: Path, capfd
) -> None:
    spec = spec_for(demo_dataset, str(tmp_path / "runs"), "resume", "on", {})
    capfd.readouterr()
    root = ensure_feature_cache(spec, {})
    store = CacheStore(root, {})
    assert store.shards() == {0, 1, 2, 3}
    # The estimate, from metadata alone, is exactly what the shards hold: every frame, 2
    # cameras, the tiny VLM's 16 tokens x 128 x 4 bytes per image.
    frames = sum(
        e.length for e in open_dataset(RunSettings.from_spec(spec), storage_options={}).episodes
    )
    estimate = f"{frames:,} frames x 2 camera(s) x 8,192 bytes (float32) = "
    assert estimate in capfd.readouterr().err
    held = 0
    for shard in Path(root).glob("episode_*.safetensors"):
        held += sum(t.numel() * t.element_size() for t in load_file(str(shard)).values())
    assert held == frames * 2 * 8192
    kept = Path(root) / "episode_000000.safetensors"
    mtime = kept.stat().st_mtime_ns
    (Path(root) / "episode_000002.safetensors").unlink()  # as if the build died there
    capfd.readouterr()
    assert ensure_feature_cache(spec, {}) == root
    assert "1 of 4 episodes to encode" in capfd.readouterr().err
    assert store.shards() == {0, 1, 2, 3} and kept.stat().st_mtime_ns == mtime
    capfd.readouterr()
    ensure_feature_cache(spec, {})
    assert "using feature cache" in capfd.readouterr().err


def test_on_refuses_non_constant_features(demo_dataset: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="augment.enable is true"):
        spec_for(demo_dataset, str(tmp_path), "x", "on", {}, data={"augment": {"enable": True}})
    with pytest.raises(SpecError, match="the vision encoder trains"):
        spec_for(
            demo_dataset,
            str(tmp_path),
            "x",
            "on",
            {},
            policy={"preset": "tiny", "freeze_vision_encoder": False, "train_expert_only": False},
        )
    auto = spec_for(
        demo_dataset, str(tmp_path), "x", "auto", {}, data={"augment": {"enable": True}}
    )
    assert ensure_feature_cache(auto, {}) is None


def test_a_build_asking_for_absent_gpus_fails_within_resource_wait_s(
    demo_dataset: str, tmp_path: Path
) -> None:
    import time

    import ray
    from ray.util import placement_group_table

    from smolvla_ray.waits import ResourceWaitTimeout

    spec = spec_for(
        demo_dataset, str(tmp_path / "runs"), "gpus", "on", {},
        scaling={"num_workers": 2, "use_gpu": True}, failure={"resource_wait_s": 2},
    )  # fmt: skip
    assert not ray.cluster_resources().get("GPU")  # this machine's Ray has none to give
    start = time.monotonic()
    with pytest.raises(ResourceWaitTimeout) as raised:
        ensure_feature_cache(spec, {})
    assert time.monotonic() - start < 30
    message = str(raised.value)
    assert message.startswith(
        "the cluster did not grant the feature-cache build's resources within "
        "failure.resource_wait_s=2s: it asks 2 task(s) x {CPU: 1, GPU: 1}; the cluster has {"
    ), message
    assert message.endswith("or raise failure.resource_wait_s")
    # Its reservation is given back: nothing of it waits on in the cluster.
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())


def test_a_cache_bigger_than_its_bound_is_not_used_or_refused(
    demo_dataset: str, tmp_path: Path, capfd
) -> None:
    storage = str(tmp_path / "runs")
    small = {"cache_max_bytes": "2MB"}
    auto = spec_for(demo_dataset, storage, "auto", "auto", {}, data=small)
    frames = sum(
        e.length for e in open_dataset(RunSettings.from_spec(auto), storage_options={}).episodes
    )
    assert 2e6 / 2 < frames * 2 * 8192 <= 2e6 * 2, frames  # float32 too big, bfloat16 fits
    capfd.readouterr()
    assert ensure_feature_cache(auto, {}) is None
    said = capfd.readouterr().err
    assert f"feature cache not used: {frames:,} frames x 2 camera(s) x 8,192 bytes" in said
    assert "it exceeds data.cache_max_bytes=2.0 MB (raise data.cache_max_bytes" in said, said
    assert said.rstrip().endswith("training decodes video"), said
    assert not (tmp_path / "runs" / "feature-cache").exists()  # nothing built
    # `on` trains through the node's LRU copy (below), unless one episode's shard (40 frames
    # x 2 cameras x 8,192 bytes) cannot fit the bound.
    tiny = spec_for(demo_dataset, storage, "on", "on", {}, data={"cache_max_bytes": "500kB"})
    with pytest.raises(
        ValueError,
        match=r"data.feature_cache='on' but the cache is too big: .*; one episode's shard "
        r"\(0.7 MB\) exceeds data.cache_max_bytes=0.5 MB",
    ):
        ensure_feature_cache(tiny, {})
    assert not (tmp_path / "runs" / "feature-cache").exists()
    half = spec_for(
        demo_dataset, storage, "half", "auto", {},
        data={**small, "feature_cache_dtype": "bfloat16"},
    )  # fmt: skip
    assert ensure_feature_cache(half, {}) is not None  # half the bytes in bfloat16: it fits


def test_on_trains_a_cache_over_its_bound_through_the_nodes_lru_copy(
    demo_dataset: str, s3_server, s3_bucket: str, tmp_path: Path, capfd
) -> None:
    # 4 episodes of 26 to 40 frames: shards of up to 40 x 2 cameras x 8,192 bytes (655 kB),
    # 2.3 MB in all; the node's copy may hold any two of them, never three. A whole epoch (17
    # batches of 8) reads every episode, so shards are evicted and downloaded again; the
    # losses still equal video's.
    storage, options = s3_server.url(s3_bucket, "runs"), s3_server.storage_options
    node = tmp_path / "node"
    bound = 1_400_000
    train = {"steps": 17, "batch_size": 8}
    cached_spec = spec_for(
        demo_dataset, storage, "bounded", "on", options, train=train,
        data={"cache_max_bytes": bound, "cache_dir": str(node)},
    )  # fmt: skip
    meta = open_dataset(RunSettings.from_spec(cached_spec), storage_options=options)
    frames = sum(e.length for e in meta.episodes)
    assert frames // 8 == 17  # one epoch, at most 7 frames left out
    capfd.readouterr()
    root = ensure_feature_cache(cached_spec, options)
    said = capfd.readouterr().err
    assert f"warning: feature cache over its bound: {frames} frames x 2 camera(s)" in said, said
    assert "every node keeps at most data.cache_max_bytes=1.4 MB of it" in said, said
    fs, path = fsspec.core.url_to_fs(root, **options)
    sizes = sorted(fs.size(p) for p in fs.ls(path) if p.endswith(".safetensors"))
    assert len(sizes) == 4 and sum(sizes[-2:]) <= bound < sum(sizes[:3])

    train_in_process(cached_spec, feature_cache=root)
    train_in_process(spec_for(demo_dataset, storage, "video", "off", options, train=train))
    features = node / "features"
    held = [p for p in features.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in held) <= bound  # all it holds, temporaries too
    # Every shard ever downloaded left its entry's lock file: all four were, at most two are
    # held, so the others were evicted.
    assert len([p for p in held if p.name.endswith(".safetensors.lock")]) == 4
    assert 1 <= len([p for p in held if p.suffix == ".safetensors"]) <= 2
    cached = read_metrics(run_uri(storage, "bounded"), options)
    video = read_metrics(run_uri(storage, "video"), options)
    assert len(cached) == 17
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in video], rel=1e-6)


def test_the_node_copy_is_warmed_before_the_first_collective(
    demo_dataset: str, s3_server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long download must not hold the other workers inside a collective (the frozen
    # fingerprint's all_gather, DDP's broadcast) until the collective timeout.
    import smolvla_ray.train.ddp as ddp
    import smolvla_ray.train.trainer as trainer

    storage, options = s3_server.url(s3_bucket, "runs"), s3_server.storage_options
    spec = spec_for(
        demo_dataset, storage, "order", "on", options,
        data={"cache_dir": str(tmp_path / "node-cache")},
    )  # fmt: skip
    root = ensure_feature_cache(spec, options)
    order: list[str] = []
    monkeypatch.setattr(FeatureShards, "warm", recorded(order, "warm", FeatureShards.warm))
    monkeypatch.setattr(
        trainer,
        "check_frozen_fingerprint",
        recorded(order, "fingerprint", trainer.check_frozen_fingerprint),
    )
    monkeypatch.setattr(trainer, "wrap_ddp", recorded(order, "ddp", ddp.wrap_ddp))
    train_in_process(spec, feature_cache=root)
    assert order == ["warm", "fingerprint", "ddp"], order
    # The cache fits its bound: the node holds every shard, downloaded before step 1.
    assert len(list((tmp_path / "node-cache" / "features").rglob("*.safetensors"))) == 4


def test_held_out_episodes_are_cached_and_never_trained_on(
    demo_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the cache on: the held-out episodes' features are in the cache (evaluations
    read them), every training sample is from a training episode, every evaluated one from
    a held-out one, and the evaluation equals the one made from video."""
    trained, evaluated = record_episodes(monkeypatch)
    held = {"episodes": [3], "every_steps": 2, "max_samples": 8}
    storage = str(tmp_path / "runs")
    cached = spec_for(
        demo_dataset, storage, "held-cache", "on", {}, eval=held,
        train={"steps": 4, "log_every": 1}, data={"cache_dir": str(tmp_path / "node")},
    )  # fmt: skip
    root = ensure_feature_cache(cached, {})
    assert root is not None and len(CacheStore(root, {}).shards()) == 4  # episode 3 too
    train_in_process(cached, feature_cache=root)
    assert len(trained) == 4 * 4 and set(trained) <= {0, 1, 2}
    assert len(evaluated) == 2 * 8 and set(evaluated) == {3}
    video = spec_for(
        demo_dataset, storage, "held-video", "off", {}, eval=held,
        train={"steps": 4, "log_every": 1},
    )  # fmt: skip
    train_in_process(video)
    a = [r for r in read_metrics(run_uri(storage, "held-cache")) if "eval/loss" in r]
    b = [r for r in read_metrics(run_uri(storage, "held-video")) if "eval/loss" in r]
    assert [r["step"] for r in a] == [2, 4]
    for key in ("eval/loss", "eval/action_mse"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5), key
