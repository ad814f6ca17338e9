"""`data.datasets`: a mixture's spec (validation, settings, resume rules) and its features
(each dataset resolved on its own, then merged), without torch or data."""

from __future__ import annotations

from typing import Any

import pytest

from smolvla_ray.features import (
    LACKS_CAMERA,
    FeatureMismatch,
    dataset_resolution,
    resolve_features,
    resolve_mixture,
)
from smolvla_ray.policy.config import PolicyConfig
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import SpecError, spec_from_dict

MIX = [{"uri": "/data/arm_a", "weight": 2}, {"uri": "/data/arm_b/", "name": "b"}]


def spec(data: dict[str, Any], **sections: Any):
    return spec_from_dict(
        {
            "name": "mix",
            "policy": {"preset": "tiny"},
            "data": data,
            "train": {"steps": 4, "batch_size": 2},
            "checkpoint": {"storage": "/tmp/runs"},
            **sections,
        }
    )


def test_a_mixture_validates_and_reaches_the_settings() -> None:
    settings = RunSettings.from_spec(spec({"datasets": MIX, "epoch_samples": 100}))
    mixture = settings.data.mixture
    assert mixture is not None
    assert [(d.name, d.uri, d.weight) for d in mixture] == [
        ("arm_a", "/data/arm_a", 2.0), ("b", "/data/arm_b/", 1.0)
    ]  # fmt: skip
    assert settings.data.uri == "/data/arm_a" and settings.data.epoch_samples == 100
    # The dict sent to the workers validates again into the same settings.
    assert RunSettings.from_spec_json(settings.spec_json).data == settings.data
    # One dataset is what it always was.
    single = RunSettings.from_spec(spec({"uri": "/data/arm_a"})).data
    assert single.mixture is None and single.uri == "/data/arm_a"


@pytest.mark.parametrize(
    ("data", "sections", "message"),
    [
        ({"datasets": MIX[:1]}, {}, "a mixture needs two or more"),
        ({"uri": "/x", "datasets": MIX}, {}, "data.datasets (a mixture) and data.uri exclude"),
        ({"datasets": [{"uri": "/a/x"}, {"uri": "/b/x"}]}, {}, "names ['x'] more than once"),
        ({"datasets": [{"uri": "/a", "weight": 0}, {"uri": "/b"}]}, {}, "greater than 0"),
        ({"datasets": [{"uri": "/a", "name": "A B"}, {"uri": "/b"}]}, {}, "must be 1-63"),
        ({}, {}, "data needs a dataset: uri (one dataset) or datasets"),
        ({"uri": "/a", "epoch_samples": 10}, {}, "data has one dataset (uri); remove it"),
        ({"datasets": MIX}, {"eval": {"episodes": [3]}}, "remove eval.episodes"),
        ({"datasets": MIX}, {"eval": {"mode": "async"}}, "use eval.mode: inline"),
        (
            {"datasets": MIX, "augment": {"enable": True}, "feature_cache": "on"},
            {},
            "data.feature_cache='on' but data.augment.enable is true",
        ),
    ],
)
def test_bad_mixtures_are_refused_naming_the_field_and_the_fix(data, sections, message) -> None:
    with pytest.raises(SpecError) as err:
        spec(data, **sections)
    assert message in str(err.value)


def test_a_mixture_takes_the_feature_cache_one_per_dataset() -> None:
    assert spec({"datasets": MIX}).feature_cache_blocker() is None
    assert spec({"datasets": MIX, "feature_cache": "on"}).data.feature_cache == "on"
    # Augmented, a mixture trains from video, as one dataset does.
    augmented = spec({"datasets": MIX, "augment": {"enable": True}})
    assert augmented.feature_cache_blocker() is not None
    assert RunSettings.from_spec(augmented).data.augment is not None


def test_a_mixture_takes_an_inline_eval_section() -> None:
    settings = RunSettings.from_spec(spec({"datasets": MIX}, eval={"split": 0.2}))
    assert settings.eval is not None and settings.eval.split == 0.2


def test_a_changed_mixture_is_refused_on_resume() -> None:
    from smolvla_ray.checkpoint.resume import ResumeRefused, check_resume_changes

    old = spec({"datasets": MIX}).public_dict()
    reweighted = [{**MIX[0], "weight": 1}, MIX[1]]
    with pytest.raises(ResumeRefused, match="data.datasets"):
        check_resume_changes(
            old, spec({"datasets": reweighted}).public_dict(), checkpoint_uri="/tmp/runs/mix/c"
        )


def _features(cameras: dict[str, tuple[int, int]], state: int, action: int) -> dict:
    out: dict[str, Any] = {
        f"observation.images.{name}": {"dtype": "video", "shape": [h, w, 3]}
        for name, (h, w) in cameras.items()
    }
    out["observation.state"] = {"dtype": "float32", "shape": [state]}
    out["action"] = {"dtype": "float32", "shape": [action]}
    return out


def test_each_dataset_resolves_on_its_own_and_the_policy_takes_the_union() -> None:
    config = PolicyConfig.preset("tiny")
    a = resolve_features(config, _features({"top": (48, 64), "wrist": (48, 64)}, 6, 6))
    b = resolve_features(config, _features({"top": (48, 64), "side": (48, 64)}, 4, 3))
    merged = resolve_mixture({"a": a, "b": b})
    assert list(merged.image_features) == [
        "observation.images.top", "observation.images.wrist", "observation.images.side"
    ]  # fmt: skip
    assert (merged.state_dim, merged.action_dim) == (6, 6)
    lacks = [r.policy_key for r in merged.datasets["b"].cameras if r.reason == LACKS_CAMERA]
    assert lacks == ["observation.images.wrist"]
    assert "dataset b:" in merged.table() and "masked out per sample" in merged.table()
    own = dataset_resolution(merged, "b")  # what an export for b carries
    assert list(own.image_features) == ["observation.images.top", "observation.images.side"]
    assert (own.state_dim, own.action_dim) == (4, 3)
    with pytest.raises(ValueError, match=r"no dataset 'c' in this mixture; its datasets are"):
        dataset_resolution(merged, "c")
    # The record survives the checkpoint's JSON.
    assert type(merged).from_json(merged.to_json()) == merged


def test_one_camera_at_two_shapes_is_refused() -> None:
    config = PolicyConfig.preset("tiny")
    a = resolve_features(config, _features({"top": (48, 64)}, 6, 6))
    b = resolve_features(config, _features({"top": (96, 128)}, 6, 6))
    with pytest.raises(FeatureMismatch, match="feed 'observation.images.top' at shapes"):
        resolve_mixture({"a": a, "b": b})
