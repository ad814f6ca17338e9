"""Feature resolution (dataset keys -> policy keys), from config.json and info.json alone.

The policy side is a real LeRobot 0.6.1 `config.json` shaped like `lerobot/smolvla_base`
(written by LeRobot's own `SmolVLAConfig._save_pretrained`, committed under tests/fixtures);
the dataset sides are `info.json` feature tables of the SO-101 pick-place and LIBERO shapes.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from smolvla_ray.build import resolve_run_features
from smolvla_ray.features import FeatureMismatch, FeatureResolution, resolve_features
from smolvla_ray.policy.config import PolicyConfig
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import JobSpec, load_spec, spec_from_dict

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BASE_CONFIG = (FIXTURES / "smolvla_base" / "config.json").read_text()
SO101 = json.loads((FIXTURES / "datasets" / "svla_so101_pickplace.info.json").read_text())
LIBERO = json.loads((FIXTURES / "datasets" / "libero.info.json").read_text())
ROOT = Path(__file__).resolve().parents[2]
CAM = "observation.images."


def resolve_spec(
    spec: JobSpec, config_json: str, dataset_features: dict
) -> tuple[PolicyConfig, FeatureResolution]:
    """A job's resolution, as the driver and every worker make it (from its settings)."""
    return resolve_run_features(RunSettings.from_spec(spec), config_json, dataset_features)


def base(**updates: Any) -> PolicyConfig:
    config = PolicyConfig.from_lerobot_json(BASE_CONFIG)
    return config.model_copy(update=updates) if updates else config


def rows(resolution: FeatureResolution) -> list[tuple[str | None, str | None, str]]:
    return [(r.dataset_key, r.policy_key, r.status) for r in resolution.cameras]


def test_smolvla_base_on_libero_with_the_rename_map() -> None:
    rename = {f"{CAM}image": f"{CAM}camera1", f"{CAM}image2": f"{CAM}camera2"}
    resolution = resolve_features(base(), LIBERO["features"], rename_map=rename)
    assert rows(resolution) == [
        (f"{CAM}image", f"{CAM}camera1", "used"),
        (f"{CAM}image2", f"{CAM}camera2", "used"),
        (None, f"{CAM}camera3", "left out"),
    ]
    assert (resolution.state_dim, resolution.action_dim) == (8, 7)  # the dataset's widths
    assert resolution.sources == {f"{CAM}camera1": f"{CAM}image", f"{CAM}camera2": f"{CAM}image2"}
    config = resolution.apply(base())
    assert list(config.image_features) == [f"{CAM}camera1", f"{CAM}camera2"]
    assert config.image_features[f"{CAM}camera1"].shape == (3, 256, 256)
    assert (config.state_dim, config.action_dim) == (8, 7)
    table = resolution.table()
    used = r"observation\.images\.image\s+->\s+observation\.images\.camera1\s+3x256x256\s+used"
    assert re.search(used, table)
    assert re.search(r"-\s+->\s+observation\.images\.camera3\s+3x256x256\s+left out", table)
    assert "zero-padded to 32" in table


def test_empty_cameras_covers_a_policy_camera_without_source() -> None:
    rename = {f"{CAM}top": f"{CAM}camera1", f"{CAM}wrist": f"{CAM}camera2"}
    resolution = resolve_features(base(empty_cameras=1), SO101["features"], rename_map=rename)
    # LeRobot adds observation.images.empty_camera_0 for empty_cameras=1; the first camera
    # without a source takes the slot (an all -1 image, masked), the rest is left out.
    assert rows(resolution) == [
        (f"{CAM}top", f"{CAM}camera1", "used"),
        (f"{CAM}wrist", f"{CAM}camera2", "used"),
        (None, f"{CAM}camera3", "empty"),
        (None, f"{CAM}empty_camera_0", "left out"),
    ]
    assert list(resolution.apply(base()).image_features) == [
        f"{CAM}camera1",
        f"{CAM}camera2",
        f"{CAM}camera3",
    ]


def test_dataset_cameras_beyond_the_policy_are_left_out_and_cameras_picks() -> None:
    features = {**SO101["features"], f"{CAM}side": SO101["features"][f"{CAM}top"]}
    rename = {f"{CAM}top": f"{CAM}camera1", f"{CAM}wrist": f"{CAM}camera2",
              f"{CAM}side": f"{CAM}camera3"}  # fmt: skip
    full = resolve_features(base(), features, rename_map=rename)
    assert [r.status for r in full.cameras] == ["used", "used", "used"]
    picked = resolve_features(
        base(), features, rename_map={f"{CAM}top": f"{CAM}camera1"}, cameras=["top"]
    )
    assert rows(picked) == [
        (f"{CAM}top", f"{CAM}camera1", "used"),
        (None, f"{CAM}camera2", "left out"),
        (None, f"{CAM}camera3", "left out"),
        (f"{CAM}wrist", None, "left out"),
        (f"{CAM}side", None, "left out"),
    ]


def test_a_preset_takes_the_dataset_cameras_as_named() -> None:
    resolution = resolve_features(PolicyConfig.preset("tiny"), SO101["features"])
    assert rows(resolution) == [(f"{CAM}top", f"{CAM}top", "used"),
                                (f"{CAM}wrist", f"{CAM}wrist", "used")]  # fmt: skip
    assert resolution.image_features[f"{CAM}top"] == (3, 480, 640)


def test_resolution_round_trips_through_json() -> None:
    rename = {f"{CAM}image": f"{CAM}camera1", f"{CAM}image2": f"{CAM}camera2"}
    resolution = resolve_features(base(), LIBERO["features"], rename_map=rename)
    assert FeatureResolution.from_json(json.loads(json.dumps(resolution.to_json()))) == resolution


SO_MAP = {f"{CAM}top": f"{CAM}camera1", f"{CAM}wrist": f"{CAM}camera2"}
MISMATCHES = {
    # case: (config updates, dataset features change, rename_map, cameras, words in message)
    "no map: no camera left": (
        {}, {}, {}, None,
        [f"{CAM}top", f"{CAM}camera1", "no dataset camera feeds the policy",
         f'--set data.rename_map=\'{{"{CAM}top": "{CAM}camera1", "{CAM}wrist": "{CAM}camera2"}}\''],
    ),
    "unknown key in the map": (
        {}, {}, {**SO_MAP, f"{CAM}front": f"{CAM}camera3"}, None,
        [f"{CAM}front", "lacks", f"{CAM}top", f"{CAM}wrist"],
    ),
    "two keys mapped to one": (
        {}, {}, {f"{CAM}top": f"{CAM}camera1", f"{CAM}wrist": f"{CAM}camera1"}, None,
        [f"{CAM}top", f"{CAM}wrist", f"{CAM}camera1"],
    ),
    "rename onto a camera the dataset keeps": (
        {}, {}, {f"{CAM}top": f"{CAM}wrist"}, None,
        [f"{CAM}top", f"{CAM}wrist", "would all feed"],
    ),
    "target the policy does not take": (
        {}, {}, {f"{CAM}top": f"{CAM}camera1", f"{CAM}wrist": f"{CAM}cam2"}, None,
        [f"{CAM}cam2", f"{CAM}camera1", f"{CAM}camera2", f"{CAM}camera3"],
    ),
    "state width above max": (
        {"max_state_dim": 6}, {"observation.state": [8]}, SO_MAP, None,
        ["observation.state", "8 dims", "max_state_dim=6"],
    ),
    "action width above max": (
        {"max_action_dim": 6}, {"action": [7]}, SO_MAP, None,
        ["'action'", "7 dims", "max_action_dim=6"],
    ),
    "unused camera while a policy camera has no source": (
        {}, {}, {f"{CAM}top": f"{CAM}camera1"}, None,
        [f"{CAM}wrist", f"{CAM}camera2", f"{CAM}camera3", "LeRobot refuses",
         f'"{CAM}wrist": "{CAM}camera2"'],
    ),
    "state renamed": (
        {}, {}, {**SO_MAP, "observation.state": "observation.joints"}, None,
        ["observation.state", "observation.joints", "only cameras"],
    ),
    "map key left out by data.cameras": (
        {}, {}, SO_MAP, ["top"],
        [f"{CAM}wrist", "data.cameras leaves out"],
    ),
    "data.cameras names a camera the dataset lacks": (
        {}, {}, SO_MAP, ["top", "side"],
        [f"{CAM}side", "lacks", f"{CAM}top"],
    ),
    "dataset without action": (
        {}, {"action": None}, SO_MAP, None,
        ["no 'action' feature"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_each_mismatch_names_the_keys_on_both_sides(case: str) -> None:
    updates, change, rename, cameras, words = MISMATCHES[case]
    features = json.loads(json.dumps(SO101["features"]))
    for key, shape in change.items():
        if shape is None:
            del features[key]
        else:
            features[key]["shape"] = shape
    with pytest.raises(FeatureMismatch) as err:
        resolve_features(base(**updates), features, rename_map=rename, cameras=cameras)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_the_printed_fix_is_a_working_set_override(tmp_path: Path) -> None:
    """The suggestion is one shell word; passed to --set it resolves."""
    spec = spec_dict(tmp_path, rename_map=None)
    with pytest.raises(FeatureMismatch) as err:
        resolve_spec(spec_from_dict(spec), BASE_CONFIG, SO101["features"])
    fix = str(err.value).split("Fix: map them: ", 1)[1]
    flag, argument = shlex.split(fix)  # the map is one quoted word, as a shell passes it
    assert flag == "--set"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    fixed = load_spec(str(path), [argument])
    _, resolution = resolve_spec(fixed, BASE_CONFIG, SO101["features"])
    assert [r.status for r in resolution.cameras] == ["used", "used", "left out"]


def spec_dict(tmp_path: Path, *, rename_map: dict | None) -> dict[str, Any]:
    data: dict[str, Any] = {"uri": str(tmp_path / "dataset")}
    if rename_map is not None:
        data["rename_map"] = rename_map
    return {
        "name": "real",
        "policy": {"pretrained": str(tmp_path / "smolvla_base")},
        "data": data,
        "train": {"steps": 10, "batch_size": 2},
        "checkpoint": {"storage": str(tmp_path / "runs")},
    }


def test_a_map_without_a_pretrained_policy_is_refused(tmp_path: Path) -> None:
    spec = spec_dict(tmp_path, rename_map=SO_MAP)
    spec["policy"] = {"preset": "tiny"}
    with pytest.raises(ValueError, match=r"data.rename_map .* policy.preset='tiny'"):
        spec_from_dict(spec)


@pytest.mark.parametrize(
    ("config", "info"),
    [("so100-finetune.yaml", SO101), ("libero-finetune.yaml", LIBERO)],
)
def test_shipped_configs_resolve_against_their_real_shapes(config: str, info: dict) -> None:
    spec = load_spec(str(ROOT / "configs" / config))
    _, resolution = resolve_spec(spec, BASE_CONFIG, info["features"])
    assert [(r.policy_key, r.status) for r in resolution.cameras][:2] == [
        (f"{CAM}camera1", "used"),
        (f"{CAM}camera2", "used"),
    ]


def test_the_kuberay_configmap_spec_resolves_against_so101() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text()))
    text = next(d for d in docs if d and d.get("kind") == "ConfigMap")["data"]["spec.yaml"]
    _, resolution = resolve_spec(spec_from_dict(yaml.safe_load(text)), BASE_CONFIG,
                                 SO101["features"])  # fmt: skip
    assert sum(r.status == "used" for r in resolution.cameras) == 2


def test_features_resolve_without_torch() -> None:
    import subprocess

    config = FIXTURES / "smolvla_base" / "config.json"
    info = FIXTURES / "datasets" / "libero.info.json"
    rename = {f"{CAM}image": f"{CAM}camera1", f"{CAM}image2": f"{CAM}camera2"}
    code = "\n".join([
        "import sys, json",
        "from smolvla_ray.features import resolve_features",
        "from smolvla_ray.policy.config import PolicyConfig",
        f"c = PolicyConfig.from_lerobot_json(open({str(config)!r}).read())",
        f"f = json.load(open({str(info)!r}))['features']",
        f"resolve_features(c, f, rename_map={rename!r})",
        "assert 'torch' not in sys.modules, 'torch imported'",
    ])  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [("adapt_to_pi_aloha", True), ("compile_model", True), ("use_peft", True)],
)
def test_unimplemented_fields_that_would_change_training_are_refused(
    tmp_path: Path, field: str, value: bool
) -> None:
    spec = spec_dict(tmp_path, rename_map=SO_MAP)
    spec["policy"]["overrides"] = {field: value}
    with pytest.raises(ValueError, match=rf"{field}=True is not supported"):
        spec_from_dict(spec)
    spec["policy"]["overrides"] = {field: False}  # the value that changes nothing is fine
    spec_from_dict(spec)


def test_a_checkpoint_config_is_refused_only_where_it_would_change_the_model() -> None:
    data = json.loads(BASE_CONFIG)
    assert data["push_to_hub"] and data["repo_id"] == "lerobot/smolvla_base"  # bookkeeping
    with pytest.raises(ValueError, match="adapt_to_pi_aloha"):
        PolicyConfig.from_lerobot_json(json.dumps({**data, "adapt_to_pi_aloha": True}))
    # use_peft marks an adapter directory, which loads on top of its base (policy/adapters.py).
    assert PolicyConfig.from_lerobot_json(json.dumps({**data, "use_peft": True})).use_peft
    # compile_model in a saved config changes no numerics: accepted (and not applied).
    assert PolicyConfig.from_lerobot_json(json.dumps({**data, "compile_model": True}))
