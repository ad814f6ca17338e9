"""A dataset mixture through `driver.run` on a real embedded Ray, checkpoints on the loopback
S3 server: each dataset's feature cache is built by the driver's Ray tasks, two Ray Train
workers train from them to the weights the same mixture reaches from video, and the result
exports for either dataset. The mixture's numerics are tested in-process
(tests/train/test_mixture.py); only the Ray path is here."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
import torch
from typer.testing import CliRunner

from smolvla_ray import driver
from smolvla_ray.cache.store import COMPLETE, KEY_FILE
from smolvla_ray.checkpoint.discovery import list_checkpoints
from smolvla_ray.cli import app
from smolvla_ray.data.meta import load_meta
from smolvla_ray.run_layout import FEATURE_CACHE_DIR, run_uri
from smolvla_ray.spec import spec_from_dict
from smolvla_ray.train.metrics import read_metrics
from tests.integration.cache.test_feature_cache import final_trainable
from tests.integration.conftest import tiny_spec_dict
from tests.train.test_mixture import two_arms  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

STEPS = 4


def mixture_spec(arms: tuple[str, str], storage: str, options: dict, name: str, cache: str):
    spec = tiny_spec_dict(
        arms[0], Path("unused"), name, storage_options=options,
        train={"steps": STEPS, "log_every": 1, "batch_size": 4},
        checkpoint={"storage": storage, "every_steps": None, "keep_last": 2},
    )  # fmt: skip
    spec["data"] = {
        "datasets": [{"uri": arms[0], "weight": 2.0}, {"uri": arms[1], "name": "b"}],
        "num_loader_workers": 0,
        "feature_cache": cache,
    }
    return spec_from_dict(spec)


def test_a_mixture_trains_on_ray_from_per_dataset_caches_as_from_video(
    two_arms: tuple[str, str],  # noqa: F811
    s3_server,
    s3_bucket: str,
    tmp_path: Path,
    capfd,
) -> None:
    storage, options = s3_server.url(s3_bucket, "runs"), s3_server.storage_options
    capfd.readouterr()
    cached = driver.run(mixture_spec(two_arms, storage, options, "cached", "on"))
    said = capfd.readouterr().err

    # One cache per dataset, each keyed by its own data and cameras, built by the Ray tasks
    # (the "built" line sums the frame counts the tasks returned: every frame of the dataset).
    fs, root = fsspec.core.url_to_fs(f"{storage}/{FEATURE_CACHE_DIR}", **options)
    dirs = sorted(fs.ls(root))
    assert len(dirs) == 2, dirs
    for name, uri, cameras in (("arm_a", two_arms[0], {"top", "wrist"}),
                               ("b", two_arms[1], {"top", "side"})):  # fmt: skip
        (path,) = [d for d in dirs if f"{d.rsplit('/', 1)[-1]} (dataset {name}): 3 of 3" in said]
        files = {p.rsplit("/", 1)[-1] for p in fs.ls(path)}
        shards = {f"episode_{e:06d}.safetensors" for e in range(3)}
        assert files == shards | {KEY_FILE, COMPLETE}, files
        key = json.loads(fs.cat(f"{path}/{KEY_FILE}"))
        assert key["dataset"]["url"].rstrip("/").endswith(Path(uri).name)
        assert {k.rsplit(".", 1)[-1] for k in key["cameras"]} == cameras
        frames = sum(e.length for e in load_meta(uri).episodes)
        assert f"feature cache built: {frames} frames in " in said, said[-3000:]

    assert cached.metrics["step"] == STEPS
    checkpoint = list_checkpoints(run_uri(storage, "cached"), options)[-1]
    assert checkpoint.step == STEPS
    records = read_metrics(run_uri(storage, "cached"), options)
    losses = [r["loss"] for r in records]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses))), losses

    # The same mixture from video: the same losses and final weights (the single-dataset
    # cache-vs-video test's tolerance).
    driver.run(mixture_spec(two_arms, storage, options, "video", "off"))
    video = [r["loss"] for r in read_metrics(run_uri(storage, "video"), options)]
    assert losses == pytest.approx(video, rel=1e-6)
    a, b = final_trainable(storage, "cached", options), final_trainable(storage, "video", options)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)

    # `smolvla-ray export` of the S3 checkpoint for each dataset.
    from smolvla_ray.policy.modeling import SmolVLAPolicy

    env = {"SMOLVLA_STORAGE_OPTIONS": json.dumps(options)}
    for name, cameras, widths in (("arm_a", {"top", "wrist"}, (6, 6)),
                                  ("b", {"top", "side"}, (4, 3))):  # fmt: skip
        out = tmp_path / f"export-{name}"
        args = ["export", checkpoint.uri, str(out), "--dataset", name]
        result = CliRunner().invoke(app, args, env=env)
        assert result.exit_code == 0, result.output
        assert f"dataset: {name}" in result.output
        policy = SmolVLAPolicy.from_pretrained(str(out))
        assert {k.rsplit(".", 1)[-1] for k in policy.config.image_features} == cameras
        assert (policy.config.state_dim, policy.config.action_dim) == widths
