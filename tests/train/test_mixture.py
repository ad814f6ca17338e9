"""Dataset mixtures (`data.datasets`) in-process: two datasets with different camera names
and state/action widths train together, a killed mixture run resumes to the very same
weights, and `export --dataset` picks whose statistics, camera keys and widths the
exported policy carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from smolvla_ray.checkpoint.discovery import list_checkpoints
from smolvla_ray.cli import app
from smolvla_ray.data.meta import load_meta
from smolvla_ray.data.synthetic import write_demo_dataset
from smolvla_ray.policy.modeling import SmolVLAPolicy
from smolvla_ray.run_layout import run_uri
from smolvla_ray.spec import spec_from_dict
from tests.inprocess import train_in_process
from tests.integration.conftest import tiny_spec_dict
from tests.train.test_trainer import trainable

TRAIN = {"steps": 8, "log_every": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def two_arms(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """`arm_a`: cameras top and wrist, 6-D state and action; `arm_b`: cameras top and
    side, 4-D state, 3-D action (both narrower than the tiny policy's max dims of 8)."""
    root = tmp_path_factory.mktemp("mixture")
    a = write_demo_dataset(str(root / "arm_a"), num_episodes=3, episode_length=30,
                           cameras=("top", "wrist"), state_dim=6, action_dim=6,
                           height=48, width=64, codec="h264")  # fmt: skip
    b = write_demo_dataset(str(root / "arm_b"), num_episodes=3, episode_length=20,
                           cameras=("top", "side"), state_dim=4, action_dim=3,
                           height=48, width=64, seed=1, codec="h264")  # fmt: skip
    return a, b


def mixture_spec(
    arms: tuple[str, str],
    storage: Path,
    name: str,
    *,
    feature_cache: str = "off",
    augment: bool = False,
    eval: dict | None = None,
    **train,
):
    spec = tiny_spec_dict(
        arms[0], storage, name, scaling={"num_workers": 1}, train={**TRAIN, **train},
        checkpoint={"storage": str(storage), "every_steps": 4},
    )  # fmt: skip
    spec["data"] = {
        "datasets": [{"uri": arms[0], "weight": 2.0}, {"uri": arms[1], "name": "b"}],
        "num_loader_workers": 0,
        "feature_cache": feature_cache,
        "augment": {"enable": augment},
    }
    if eval is not None:
        spec["eval"] = eval
    return spec_from_dict(spec)


def test_a_mixture_trains_and_a_killed_run_resumes_to_the_same_weights(
    tmp_path: Path, two_arms: tuple[str, str]
) -> None:
    state, reporter = train_in_process(mixture_spec(two_arms, tmp_path, "whole"))
    assert state is not None and state.step == 8
    losses = [r["loss"] for r in reporter.reports]
    assert all(torch.isfinite(torch.tensor(losses))), losses

    killed = mixture_spec(two_arms, tmp_path, "killed")
    assert train_in_process(killed, stop_after=6)[0] is None  # newest checkpoint: 4
    state, _ = train_in_process(killed)
    assert state is not None and state.resumed_from_step == 4
    a, b = trainable(tmp_path, "whole", 8), trainable(tmp_path, "killed", 8)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # The checkpoint records both datasets' resolutions: the policy takes the union of the
    # cameras and the widest state and action.
    info = list_checkpoints(run_uri(str(tmp_path), "whole"))[-1]
    state_json = json.loads((Path(info.uri) / "state.json").read_text())
    assert list(state_json["features"]["datasets"]) == ["arm_a", "b"]
    inputs = state_json["policy_config"]["input_features"]
    assert sorted(inputs) == sorted(
        ["observation.images.top", "observation.images.wrist", "observation.images.side",
         "observation.state"]
    )  # fmt: skip
    assert inputs["observation.state"]["shape"] == [6]

    # export --dataset: that dataset's statistics, cameras and widths; default the first.
    runner = CliRunner()
    for dataset, uri, cameras, widths in (
        ("b", two_arms[1], {"top", "side"}, (4, 3)),
        (None, two_arms[0], {"top", "wrist"}, (6, 6)),
    ):
        out = tmp_path / f"export-{dataset}"
        args = ["export", info.uri, str(out)] + (["--dataset", dataset] if dataset else [])
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f"dataset: {dataset or 'arm_a'}" in result.output
        policy = SmolVLAPolicy.from_pretrained(str(out))
        assert {k.rsplit(".", 1)[-1] for k in policy.config.image_features} == cameras
        assert (policy.config.state_dim, policy.config.action_dim) == widths
        stats = load_meta(uri).stats
        for key in ("observation.state", "action"):
            expected = torch.as_tensor(stats[key]["mean"], dtype=torch.float32)
            assert torch.equal(policy.processor.stats[key]["mean"], expected), key
    bad = runner.invoke(app, ["export", info.uri, str(tmp_path / "x"), "--dataset", "c"])
    assert bad.exit_code == 2 and "['arm_a', 'b']" in bad.output


def test_each_sample_is_normalized_padded_and_masked_as_its_dataset(
    tmp_path: Path, two_arms: tuple[str, str]
) -> None:
    """A batch of the mixture loader: dataset b's samples normalized with b's statistics,
    then zero-padded; the camera b lacks all zeros (-1 after scaling) with its mask off;
    its real action dims marked; and a's samples as a's."""
    from smolvla_ray.build import build_policy, open_dataset
    from smolvla_ray.data.samples import FrameDataset
    from smolvla_ray.settings import RunSettings
    from smolvla_ray.train.setup import build_loader

    settings = RunSettings.from_spec(mixture_spec(two_arms, tmp_path, "batch"))
    meta = open_dataset(settings, storage_options={})
    policy = build_policy(settings, meta, storage_options={})
    loader = build_loader(settings, meta, policy, rank=0, world_size=1, cursor=None,
                          storage_options={}, device=torch.device("cpu"))  # fmt: skip
    seen = set()
    for batch, _ in zip(loader, range(6), strict=False):
        for i, (d, index) in enumerate(zip(batch["dataset_index"], batch["index"], strict=True)):
            d, index = int(d), int(index)
            seen.add(d)
            uri, lacks, width = (two_arms[1], "wrist", 3) if d == 1 else (two_arms[0], "side", 6)
            raw = FrameDataset(uri, chunk_size=policy.config.chunk_size)[index]
            stats = load_meta(uri).stats
            mean = torch.as_tensor(stats["observation.state"]["mean"], dtype=torch.float32)
            std = torch.as_tensor(stats["observation.state"]["std"], dtype=torch.float32)
            state = batch["observation.state"][i]
            torch.testing.assert_close(
                state[: len(mean)], (raw["observation.state"] - mean) / (std + 1e-8)
            )
            assert torch.count_nonzero(state[len(mean) :]) == 0
            assert torch.count_nonzero(batch["action"][i, :, width:]) == 0
            assert int(batch["action_dim_mask"][i].sum()) == width
            assert not bool(batch[f"observation.images.{lacks}_padding_mask"][i])
            assert torch.count_nonzero(batch[f"observation.images.{lacks}"][i]) == 0
            assert bool(batch["observation.images.top_padding_mask"][i])
    assert seen == {0, 1}


def build_cache_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ensure_feature_cache` encodes in this process (the Ray task's body, no Ray)."""
    from smolvla_ray.cache import build
    from smolvla_ray.settings import RunSettings

    def encode_here(spec, options, root, missing, *, dataset=None):
        settings = RunSettings.from_spec(spec)
        return [build.encode_episodes(settings, options, root, missing, dataset=dataset)]

    monkeypatch.setattr(build, "_run_encode_tasks", encode_here)


def test_a_mixture_trains_from_per_dataset_feature_caches_as_from_video(
    tmp_path: Path, two_arms: tuple[str, str], monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """One cache per dataset, each keyed by its own data and cameras; training from them
    equals training from video (b lacks the wrist camera: the cache feeds the encoder's
    features of the -1 image the video path encodes, masked out alike), and a killed cached
    run resumes to the very same weights."""
    from smolvla_ray.cache.build import ensure_feature_cache
    from smolvla_ray.cache.store import KEY_FILE, CacheStore

    build_cache_here(monkeypatch)
    cached = mixture_spec(two_arms, tmp_path, "cached", feature_cache="on")
    roots = ensure_feature_cache(cached, {})
    assert isinstance(roots, dict) and list(roots) == ["arm_a", "b"]
    assert roots["arm_a"] != roots["b"]  # the key differs per dataset
    err = capfd.readouterr().err
    assert "dataset arm_a: " in err and "dataset b: " in err and "in all" in err
    for name, uri, cameras in (("arm_a", two_arms[0], {"top", "wrist"}),
                               ("b", two_arms[1], {"top", "side"})):  # fmt: skip
        store = CacheStore(roots[name], {})
        assert store.shards() == {0, 1, 2}
        key = json.loads((Path(roots[name]) / KEY_FILE).read_text())
        assert key["dataset"]["url"].rstrip("/").endswith(Path(uri).name)
        assert {k.rsplit(".", 1)[-1] for k in key["cameras"]} == cameras  # the ones it feeds
    # Built once: a second run finds both.
    assert ensure_feature_cache(cached, {}) == roots
    assert capfd.readouterr().err.count("using feature cache") == 2

    # The loader reads features, never video: every camera as `.features`, masked per sample.
    from smolvla_ray.build import build_policy, open_dataset
    from smolvla_ray.settings import RunSettings
    from smolvla_ray.train.setup import build_loader, fetch_feature_cache

    settings = RunSettings.from_spec(cached)
    meta = open_dataset(settings, storage_options={})
    policy = build_policy(settings, meta, storage_options={})
    features = fetch_feature_cache(settings, meta, roots, {})
    batch = next(iter(build_loader(settings, meta, policy, rank=0, world_size=1, cursor=None,
                                   storage_options={}, device=torch.device("cpu"),
                                   features=features)))  # fmt: skip
    images = {k for k in batch if k.startswith("observation.images.")}
    assert images == {f"observation.images.{c}{s}" for c in ("top", "wrist", "side")
                      for s in (".features", "_padding_mask")}  # fmt: skip

    state, from_cache = train_in_process(cached, feature_cache=roots)  # type: ignore[arg-type]
    assert state is not None and state.step == 8
    _, from_video = train_in_process(mixture_spec(two_arms, tmp_path, "video"))
    cached_losses = [r["loss"] for r in from_cache.reports]
    video_losses = [r["loss"] for r in from_video.reports]
    assert cached_losses == pytest.approx(video_losses, rel=1e-6)
    a, b = trainable(tmp_path, "cached", 8), trainable(tmp_path, "video", 8)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)

    killed = mixture_spec(two_arms, tmp_path, "killed-cached", feature_cache="on")
    assert train_in_process(killed, stop_after=6, feature_cache=roots)[0] is None  # type: ignore[arg-type]
    state, _ = train_in_process(killed, feature_cache=roots)  # type: ignore[arg-type]
    assert state is not None and state.resumed_from_step == 4
    resumed = trainable(tmp_path, "killed-cached", 8)
    for name in a:
        assert torch.equal(a[name], resumed[name]), name


def test_an_augmented_mixture_keys_each_dataset_apart_and_resumes_exactly(
    tmp_path: Path, two_arms: tuple[str, str]
) -> None:
    """With data.augment on, the loader processes augment each mixture sample after it is
    conformed: the cameras its dataset has, keyed by (seed, epoch, dataset, index, camera),
    so a's and b's frames with the same index draw apart; the camera b lacks stays all
    zeros (-1 after scaling). A killed augmented run resumes to the very same weights."""
    from smolvla_ray.build import build_policy, open_dataset
    from smolvla_ray.settings import RunSettings
    from smolvla_ray.train.setup import build_loader

    spec = mixture_spec(two_arms, tmp_path, "augmented", augment=True)
    settings = RunSettings.from_spec(spec)
    meta = open_dataset(settings, storage_options={})
    policy = build_policy(settings, meta, storage_options={})
    loader = build_loader(settings, meta, policy, rank=0, world_size=1, cursor=None,
                          storage_options={}, device=torch.device("cpu"))  # fmt: skip
    mixture, augment = loader.dataset, loader.sample_transform
    assert augment is not None
    top = "observation.images.top"
    a, b = mixture[0], mixture[int(mixture.offsets[1])]  # each dataset's first frame
    assert int(a["index"]) == int(b["index"]) == 0
    assert a[top].dtype == torch.float32  # augmented images travel as float32
    b_with_a_image = {**b, top: a[top]}
    assert not torch.equal(augment(a, 0)[top], augment(b_with_a_image, 0)[top])

    # The loader's first batch is the augmenter's output for its rows: b's wrist untouched.
    batch = next(iter(loader))
    for i, row in enumerate(loader.epoch_order(0)[: len(batch["index"])].tolist()):
        alone = augment(mixture[row], 0)
        for key in ("observation.images.top", "observation.images.wrist",
                    "observation.images.side"):  # fmt: skip
            assert torch.equal(batch[key][i], alone[key]), (row, key)
        if int(alone["dataset_index"]) == 1:
            assert torch.count_nonzero(batch["observation.images.wrist"][i]) == 0

    state, _ = train_in_process(spec)
    assert state is not None and state.step == 8
    killed = mixture_spec(two_arms, tmp_path, "augmented-killed", augment=True)
    assert train_in_process(killed, stop_after=6)[0] is None  # newest checkpoint: 4
    state, _ = train_in_process(killed)
    assert state is not None and state.resumed_from_step == 4
    whole, resumed = trainable(tmp_path, "augmented", 8), trainable(tmp_path, "augmented-killed", 8)
    assert set(whole) == set(resumed)
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


@pytest.fixture(scope="module")
def two_arms_six(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """`two_arms`' datasets with six episodes each (task = episode mod 3: two per task)."""
    root = tmp_path_factory.mktemp("mixture-eval")
    a = write_demo_dataset(str(root / "arm_a"), num_episodes=6, episode_length=12,
                           cameras=("top", "wrist"), state_dim=6, action_dim=6,
                           height=48, width=64, codec="h264")  # fmt: skip
    b = write_demo_dataset(str(root / "arm_b"), num_episodes=6, episode_length=10,
                           cameras=("top", "side"), state_dim=4, action_dim=3,
                           height=48, width=64, seed=1, codec="h264")  # fmt: skip
    return a, b


EVAL = {"split": 0.3, "every_steps": 4, "max_samples": 8}


def test_a_mixture_holds_out_each_datasets_episodes_and_evaluates_them_apart(
    tmp_path: Path, two_arms_six: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """eval.split holds out the last ceil(2 x 0.3) = 1 episode of each task of each dataset;
    no held-out frame of either reaches a training batch; every evaluation evaluates both
    datasets' held-out samples and reports the overall metrics and each dataset's; a killed
    run with eval on resumes to the very same weights and evaluation."""
    from smolvla_ray.build import mixture_eval_episodes, mixture_run_episodes, open_mixture
    from smolvla_ray.data.loader import ShardedLoader
    from smolvla_ray.settings import RunSettings
    from smolvla_ray.train.evaluation import HeldOut

    spec = mixture_spec(two_arms_six, tmp_path, "eval", eval=EVAL)
    settings = RunSettings.from_spec(spec)
    metas = open_mixture(settings, storage_options={})
    assert mixture_eval_episodes(settings, metas) == {"arm_a": [3, 4, 5], "b": [3, 4, 5]}
    assert mixture_run_episodes(settings, metas) == {"arm_a": [0, 1, 2], "b": [0, 1, 2]}

    trained: list[tuple[int, int]] = []
    evaluated: list[tuple[int, int]] = []
    real_iter, real_batches = ShardedLoader.__iter__, HeldOut.batches

    def pairs(batch) -> list[tuple[int, int]]:
        return list(zip(batch["dataset_index"].tolist(), batch["episode_index"].tolist(),
                        strict=True))  # fmt: skip

    def training_batches(loader):
        for batch in real_iter(loader):
            trained.extend(pairs(batch))
            yield batch

    def held_out_batches(held_out, **kwargs):
        for batch in real_batches(held_out, **kwargs):
            evaluated.extend(pairs(batch))
            yield batch

    monkeypatch.setattr(ShardedLoader, "__iter__", training_batches)
    monkeypatch.setattr(HeldOut, "batches", held_out_batches)
    state, reporter = train_in_process(spec)
    assert state is not None and state.step == 8
    assert len(trained) >= 8 * 4  # every training sample, checked one by one
    assert {e for _, e in trained} <= {0, 1, 2} and {d for d, _ in trained} == {0, 1}
    assert {e for _, e in evaluated} <= {3, 4, 5}
    assert {(0, 3), (0, 5), (1, 3), (1, 5)} <= set(evaluated)  # first and last of each
    assert len(evaluated) == 2 * (8 + 8)  # 2 evaluations x 8 samples of each dataset

    evals = [r for r in reporter.reports if "eval/loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for report in evals:
        assert report["eval/samples"] == 16
        assert report["eval/arm_a/samples"] == report["eval/b/samples"] == 8
        for key in ("loss", "action_mse", "action_l1", "action_mse_robot", "action_l1_robot"):
            values = [report[f"eval/{key}"], report[f"eval/arm_a/{key}"], report[f"eval/b/{key}"]]
            assert all(torch.isfinite(torch.tensor(values))), (key, values)
        # The overall errors weigh each dataset by its valid (step, own dim) elements.
        low, high = sorted([report["eval/arm_a/action_mse"], report["eval/b/action_mse"]])
        assert low <= report["eval/action_mse"] <= high
    table = json.loads((Path(run_uri(str(tmp_path), "eval")) / "eval/eval_000000008.json")
                       .read_text())  # fmt: skip
    assert list(table["datasets"]) == ["arm_a", "b"]
    assert len(table["datasets"]["b"]["per_dimension"]["mse"]) == 3  # b's own action dims

    killed = mixture_spec(two_arms_six, tmp_path, "eval-killed", eval=EVAL)
    assert train_in_process(killed, stop_after=6)[0] is None  # newest checkpoint: 4
    state, resumed = train_in_process(killed)
    assert state is not None and state.resumed_from_step == 4
    whole, again = trainable(tmp_path, "eval", 8), trainable(tmp_path, "eval-killed", 8)
    for name in whole:
        assert torch.equal(whole[name], again[name]), name
    final = next(r for r in resumed.reports if r["step"] == 8)
    for key, value in evals[-1].items():
        if key.startswith("eval/") and key != "eval/seconds":
            assert final[key] == value, key

    # Offline `evaluate` takes one dataset's policy: a mixture checkpoint is refused, saying how.
    last = list_checkpoints(run_uri(str(tmp_path), "eval"))[-1]
    result = CliRunner().invoke(
        app, ["evaluate", last.uri, "--data", two_arms_six[0], "--out", str(tmp_path / "ev")]
    )
    assert result.exit_code == 2, result.output
    assert "['arm_a', 'b']" in result.output and "--dataset NAME" in result.output
