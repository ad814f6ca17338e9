"""Which dataset feature feeds which policy input, decided before anything starts.

A pretrained SmolVLA names its cameras (`lerobot/smolvla_base`: `camera1`, `camera2`,
`camera3`); a dataset names its own (`top`, `wrist`). LeRobot 0.6.1 joins them with a
`rename_map` (dataset key -> policy key, applied to observations by the preprocessor's
first step) and is lenient about the rest: a policy camera with no source is dropped or, up
to `empty_cameras`, fed as an all -1 image with its mask off; the state and action are
zero-padded to `max_state_dim` / `max_action_dim` whatever width the checkpoint declared.

This module does the same resolution from two JSON documents only, the policy's
`config.json` and the dataset's `info.json`, so `validate`, `run` and `submit` can refuse a
mismatch before torch, a model or Ray is touched, and every worker, the feature-cache build
and `export` derive the very same answer. Where LeRobot is silent we are explicit: each
camera's fate is a row of a table that is printed at start and recorded in checkpoints.

Only cameras are renamed: `observation.state` and `action` are matched by name, because
SmolVLA has exactly one state and one action input (a map that renames them is refused).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from smolvla_ray.keys import ACTION, IMAGE_PREFIX, OBS_STATE
from smolvla_ray.policy.config import PolicyConfig, PolicyFeature
from smolvla_ray.storage import filesystem, join

# LeRobot's SmolVLAConfig.validate_features adds these input features, one per empty camera.
EMPTY_CAMERA = f"{IMAGE_PREFIX}empty_camera_{{index}}"
EMPTY_CAMERA_SHAPE = (3, 480, 640)
CAMERA_DTYPES = ("video",)

CameraStatus = Literal["used", "empty", "left out"]


class FeatureMismatch(ValueError):
    """The dataset cannot feed the policy as configured; the message names the keys on both
    sides and the fix."""


@dataclass(frozen=True)
class CameraRow:
    """One camera's fate: which dataset key feeds which policy key, or neither."""

    dataset_key: str | None
    """None: a policy camera the dataset does not provide."""
    policy_key: str | None
    """None: a dataset camera the policy does not take."""
    shape: tuple[int, int, int]
    """(C, H, W): the dataset's shape when it has the camera, else the policy's."""
    status: CameraStatus
    reason: str = ""


@dataclass(frozen=True)
class FeatureResolution:
    """The resolved features of one (policy, dataset) pair."""

    cameras: tuple[CameraRow, ...]
    state_dim: int
    action_dim: int
    max_state_dim: int
    max_action_dim: int
    rename_map: dict[str, str] = field(default_factory=dict)
    """The map as the user gave it (dataset key -> policy key); the preprocessor applies it."""
    datasets: dict[str, FeatureResolution] = field(default_factory=dict)
    """For a mixture (`resolve_mixture`): each dataset's own resolution by name, in the
    spec's order, its rows marking the policy cameras it lacks; empty for one dataset."""

    @property
    def sources(self) -> dict[str, str]:
        """Policy camera key -> dataset camera key, for the cameras that are used."""
        return {r.policy_key: r.dataset_key for r in self.cameras if r.status == "used"}  # type: ignore[misc]

    @property
    def image_features(self) -> dict[str, tuple[int, int, int]]:
        """The cameras the policy is trained with, in the policy's order: used and empty."""
        return {
            r.policy_key: r.shape
            for r in self.cameras
            if r.policy_key is not None and r.status in ("used", "empty")
        }

    def apply(self, config: PolicyConfig) -> PolicyConfig:
        """`config` with these features: the cameras actually trained, the dataset's widths."""
        inputs = {
            key: PolicyFeature(type="VISUAL", shape=shape)
            for key, shape in self.image_features.items()
        }
        inputs[OBS_STATE] = PolicyFeature(type="STATE", shape=(self.state_dim,))
        outputs = {ACTION: PolicyFeature(type="ACTION", shape=(self.action_dim,))}
        return config.model_copy(update={"input_features": inputs, "output_features": outputs})

    def table(self) -> str:
        """A fixed-width table of every camera and the state/action widths; for a mixture,
        one per dataset, then the policy's inputs."""
        if self.datasets:
            parts = [f"dataset {name}:\n{r.table()}" for name, r in self.datasets.items()]
            cameras = ", ".join(self.image_features)
            parts.append(
                f"policy: cameras [{cameras}], state {self.state_dim}, action "
                f"{self.action_dim} (the widest dataset's; each sample zero-padded to "
                f"{self.max_state_dim} / {self.max_action_dim}, its loss masked to its own "
                "action dims)"
            )
            return "\n".join(parts)
        rows = [("dataset key", "policy key", "shape", "status")]
        for r in self.cameras:
            status = r.status + (f" ({r.reason})" if r.reason else "")
            rows.append(
                (r.dataset_key or "-", r.policy_key or "-", "x".join(map(str, r.shape)), status)
            )
        rows.append((OBS_STATE, OBS_STATE, str(self.state_dim),
                     f"used (zero-padded to {self.max_state_dim})"))  # fmt: skip
        rows.append((ACTION, ACTION, str(self.action_dim),
                     f"used (zero-padded to {self.max_action_dim})"))  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            f"{a:<{widths[0]}}  ->  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows
        ]
        return "\n".join(line.rstrip() for line in lines)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureResolution:
        cameras = tuple(
            CameraRow(**{**row, "shape": tuple(row["shape"])}) for row in data["cameras"]
        )
        datasets = {k: cls.from_json(v) for k, v in (data.get("datasets") or {}).items()}
        return cls(
            **{
                **data,
                "cameras": cameras,
                "rename_map": dict(data["rename_map"]),
                "datasets": datasets,
            }
        )


LACKS_CAMERA = "this dataset lacks it: an all -1 image, masked out per sample"


def dataset_resolution(resolution: FeatureResolution, name: str) -> FeatureResolution:
    """A mixture dataset's own resolution, as an export for it carries it: the policy
    cameras it lacks dropped (masked out in training, so leaving them out at inference
    changes no action: masked image tokens are never attended to and take no position),
    its own widths. Raises ValueError naming the mixture's datasets for an unknown name."""
    if name not in resolution.datasets:
        raise ValueError(
            f"no dataset {name!r} in this mixture; its datasets are {list(resolution.datasets)}"
        )
    own = resolution.datasets[name]
    rows = tuple(c for c in own.cameras if c.reason != LACKS_CAMERA)
    return replace(own, cameras=rows, datasets={})


def resolve_mixture(resolutions: Mapping[str, FeatureResolution]) -> FeatureResolution:
    """The policy's features for a mixture, from each dataset's own resolution against the
    policy (by name, in the spec's order): its cameras are every camera some dataset feeds
    (or an empty slot), in the order they first appear; its state and action widths are
    the widest dataset's. A dataset lacking one of those cameras feeds it an all -1 image
    with its mask off, per sample; a narrower one is zero-padded, its loss masked to its own
    action dims. Raises `FeatureMismatch` when two datasets feed one camera at different
    shapes (a batch holds one shape per camera)."""
    shapes: dict[str, tuple[int, int, int]] = {}
    owner: dict[str, str] = {}
    fed_by: dict[str, list[str]] = {}
    problems = []
    for name, r in resolutions.items():
        for key, shape in r.image_features.items():
            if key in shapes and shapes[key] != shape:
                problems.append(
                    f"datasets {owner[key]!r} and {name!r} feed {key!r} at shapes "
                    f"{'x'.join(map(str, shapes[key]))} and {'x'.join(map(str, shape))}; a "
                    "batch holds one shape per camera: mix datasets recorded at one "
                    "resolution per camera, or map one of them to another camera"
                )
                continue
            shapes.setdefault(key, shape)
            owner.setdefault(key, name)
            if key in r.sources:
                fed_by.setdefault(key, []).append(name)
    if problems:
        raise FeatureMismatch("; ".join(problems))
    per: dict[str, FeatureResolution] = {}
    for name, r in resolutions.items():
        by_key = {c.policy_key: c for c in r.cameras if c.policy_key in shapes}
        rows = [
            by_key[k] if k in by_key else CameraRow(None, k, v, "empty", LACKS_CAMERA)
            for k, v in shapes.items()
        ]  # the policy's camera order: an export of this dataset keeps it
        rows += [c for c in r.cameras if c.policy_key not in shapes]
        per[name] = replace(r, cameras=tuple(rows))
    merged = tuple(
        CameraRow(None, key, shape, "used", f"fed by {', '.join(fed_by[key])}")
        if key in fed_by
        else CameraRow(None, key, shape, "empty", "no dataset feeds it: an all -1 image")
        for key, shape in shapes.items()
    )
    first = next(iter(resolutions.values()))
    return FeatureResolution(
        cameras=merged,
        state_dim=max(r.state_dim for r in resolutions.values()),
        action_dim=max(r.action_dim for r in resolutions.values()),
        max_state_dim=first.max_state_dim,
        max_action_dim=first.max_action_dim,
        rename_map=dict(first.rename_map),
        datasets=per,
    )


def _flow_mapping(mapping: Mapping[str, str]) -> str:
    """A YAML flow mapping (JSON is YAML) quoted for a shell: keys hold dots."""
    return "'" + json.dumps(dict(mapping)) + "'"


def dataset_cameras(features: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[int, int, int]]:
    """Camera key -> (C, H, W) from `info.json` features (stored as H, W, C)."""
    cameras = {}
    for key, ft in features.items():
        if ft.get("dtype") in CAMERA_DTYPES:
            height, width, channels = (int(v) for v in ft["shape"])
            cameras[key] = (channels, height, width)
    return cameras


def resolve_features(
    config: PolicyConfig,
    dataset_features: Mapping[str, Mapping[str, Any]],
    *,
    rename_map: Mapping[str, str] | None = None,
    cameras: Sequence[str] | None = None,
    policy_source: str = "the policy",
    dataset_source: str = "the dataset",
) -> FeatureResolution:
    """Resolve the dataset's features against `config`'s; raise `FeatureMismatch` naming
    every problem and the fix.

    `cameras` (short names or full keys, as `data.cameras`) picks dataset cameras before
    renaming; unpicked ones are left out on purpose. When `config` declares no camera (a
    preset), the policy takes the picked cameras as they are named after renaming.
    """
    rename = dict(rename_map or {})
    available = dataset_cameras(dataset_features)
    problems: list[str] = []

    if cameras is not None:
        picked_keys = [c if c.startswith(IMAGE_PREFIX) else IMAGE_PREFIX + c for c in cameras]
        absent = [k for k in picked_keys if k not in available]
        if absent:
            problems.append(
                f"data.cameras names {absent}, which {dataset_source} lacks; it has "
                f"{sorted(available)}"
            )
        picked = {k: available[k] for k in picked_keys if k in available}
    else:
        picked = dict(available)

    problems += _check_rename_map(rename, available, picked, dataset_source)
    renamed = {rename.get(k, k): k for k in picked}  # policy key -> dataset key
    targets = [rename.get(k, k) for k in picked]
    for target in {t for t in targets if targets.count(t) > 1}:
        sources = sorted(k for k in picked if rename.get(k, k) == target)
        problems.append(
            f"{sources} would all feed {target!r}; a policy camera takes one dataset camera"
        )

    declared = dict(config.image_features)
    for index in range(config.empty_cameras):  # as LeRobot's validate_features
        declared.setdefault(
            EMPTY_CAMERA.format(index=index), PolicyFeature(type="VISUAL", shape=EMPTY_CAMERA_SHAPE)
        )
    if any(not k.startswith("observation.images.empty_camera_") for k in declared):
        policy_keys = list(declared)
    else:  # no camera declared (a preset): the renamed dataset cameras, then empty slots
        policy_keys = list(renamed) + list(declared)

    unknown_targets = sorted(
        v
        for k, v in rename.items()
        if k in picked and v.startswith(IMAGE_PREFIX) and v not in policy_keys
    )
    if unknown_targets:
        problems.append(
            f"data.rename_map maps to {unknown_targets}, which {policy_source} does not take; "
            f"its cameras are {[k for k in policy_keys if k in declared]}"
        )

    rows: list[CameraRow] = []
    unsourced = [k for k in policy_keys if k not in renamed]
    empties = set(unsourced[: config.empty_cameras])
    for key in policy_keys:
        if key in renamed:
            rows.append(CameraRow(renamed[key], key, picked[renamed[key]], "used"))
        elif key in empties:
            rows.append(CameraRow(None, key, tuple(declared[key].shape), "empty",
                                  "no source: an all -1 image, masked out"))  # fmt: skip
        else:
            rows.append(CameraRow(None, key, tuple(declared[key].shape), "left out",
                                  "no source, beyond empty_cameras"))  # fmt: skip
    unused = [k for k in picked if rename.get(k, k) not in policy_keys]
    for key in unused:
        rows.append(CameraRow(key, None, picked[key], "left out", "the policy does not take it"))
    for key in available:
        if key not in picked:
            rows.append(CameraRow(key, None, available[key], "left out", "not in data.cameras"))

    used = [r for r in rows if r.status == "used"]
    missing_sources = [k for k in unsourced if k not in empties]
    if not problems and (not used or (unused and missing_sources)):
        suggestion = _suggest(rename, unused, [k for k in unsourced if not _is_empty_slot(k)])
        what = (
            "no dataset camera feeds the policy"
            if not used
            else f"dataset camera(s) {unused} feed nothing while policy camera(s) "
            f"{missing_sources} have no source (LeRobot refuses this too)"
        )
        fix = (
            f"map them: --set data.rename_map={_flow_mapping(suggestion)}"
            if suggestion
            else "map a dataset camera to a policy camera with data.rename_map"
        )
        problems.append(
            f"{what}: {dataset_source} has cameras {sorted(available)}, {policy_source} takes "
            f"{[k for k in policy_keys if not _is_empty_slot(k)]}. Fix: {fix}"
        )

    state_dim = _width(dataset_features, OBS_STATE, config.max_state_dim, "max_state_dim",
                       dataset_source, policy_source, problems)  # fmt: skip
    action_dim = _width(dataset_features, ACTION, config.max_action_dim, "max_action_dim",
                        dataset_source, policy_source, problems)  # fmt: skip
    if problems:
        raise FeatureMismatch("; ".join(problems))
    return FeatureResolution(
        cameras=tuple(rows),
        state_dim=state_dim,
        action_dim=action_dim,
        max_state_dim=config.max_state_dim,
        max_action_dim=config.max_action_dim,
        rename_map=rename,
    )


def _is_empty_slot(key: str) -> bool:
    return key.startswith(f"{IMAGE_PREFIX}empty_camera_")


def _check_rename_map(
    rename: Mapping[str, str],
    available: Mapping[str, Any],
    picked: Mapping[str, Any],
    dataset_source: str,
) -> list[str]:
    problems = []
    for source, target in rename.items():
        if not source.startswith(IMAGE_PREFIX) or not target.startswith(IMAGE_PREFIX):
            problems.append(
                f"data.rename_map entry {source!r}: {target!r} is not camera to camera; only "
                f"cameras ({IMAGE_PREFIX}*) are renamed, {OBS_STATE} and {ACTION} are matched "
                "by name"
            )
        elif source not in available:
            problems.append(
                f"data.rename_map renames {source!r}, which {dataset_source} lacks; its cameras "
                f"are {sorted(available)}"
            )
        elif source not in picked:
            problems.append(
                f"data.rename_map renames {source!r}, which data.cameras leaves out; add it to "
                "data.cameras or drop the entry"
            )
    return problems


def _suggest(
    rename: Mapping[str, str], unused: Sequence[str], unsourced: Sequence[str]
) -> dict[str, str]:
    """The whole rename map to try: the user's entries plus unused dataset cameras paired in
    order with policy cameras that have no source."""
    suggestion = {k: v for k, v in rename.items() if k not in unused}
    suggestion.update(zip(unused, unsourced, strict=False))
    return suggestion


def _width(
    features: Mapping[str, Mapping[str, Any]],
    key: str,
    limit: int,
    limit_name: str,
    dataset_source: str,
    policy_source: str,
    problems: list[str],
) -> int:
    feature = features.get(key)
    if feature is None:
        problems.append(f"{dataset_source} has no {key!r} feature; SmolVLA needs one")
        return 0
    shape = feature.get("shape") or [0]
    if len(shape) != 1:
        problems.append(f"{dataset_source}'s {key!r} has shape {list(shape)}; expected [width]")
        return 0
    width = int(shape[0])
    if width > limit:
        problems.append(
            f"{dataset_source}'s {key!r} has {width} dims, more than {policy_source}'s "
            f"{limit_name}={limit}: its projection is {limit} wide, so this robot needs a "
            f"policy built with {limit_name} >= {width}"
        )
    return width


# -- a run's features ------------------------------------------------------------------------


def base_config(
    pretrained_config_json: str | None,
    *,
    preset: Literal["tiny", "base"] | None,
    pretrained: str | None,
    updates: Mapping[str, Any],
) -> PolicyConfig:
    """The policy's config before feature resolution: the pretrained `config.json` (the text
    read from `pretrained`) or the preset, with `updates` on top: the run's policy updates
    and its optimizer and scheduler values, so checkpoints and exported `config.json` files
    record what the run used, as LeRobot's do."""
    if preset is not None:
        return PolicyConfig.preset(preset, **updates)
    source = f"{pretrained}/config.json"
    if pretrained_config_json is None:
        raise FileNotFoundError(f"{source} could not be read")
    config = PolicyConfig.from_lerobot_json(pretrained_config_json, source=source)
    return PolicyConfig.model_validate({**config.model_dump(), **updates}) if updates else config


def read_pretrained_config(
    source: str, storage_options: Mapping[str, Any], *, revision: str | None = None
) -> str:
    """The text of a pretrained policy's `config.json` alone (no weights): from a local
    directory, any fsspec URL, or a hub id (through the local Hugging Face cache first)."""
    if "://" not in source and Path(source).expanduser().is_dir():
        path = Path(source).expanduser() / "config.json"
        if not path.exists():
            raise FileNotFoundError(
                f"policy.pretrained={source!r} has no config.json: point it at a LeRobot "
                "pretrained_model/ directory"
            )
        return path.read_text()
    if "://" in source:
        fs, root = filesystem(source, storage_options)
        path = join(root, "config.json")
        if not fs.exists(path):
            raise FileNotFoundError(
                f"policy.pretrained={source!r} has no config.json: point it at a LeRobot "
                "pretrained_model/ directory"
            )
        return fs.cat_file(path).decode()
    from smolvla_ray import hub

    return (hub.model_file(source, "config.json", revision=revision)).read_text()
