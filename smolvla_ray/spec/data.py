"""The data sections of a job spec: one dataset (`data.uri`, ...) or a weighted mixture
(`data.datasets`), episode selections, camera renames and augmentation."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, Field, field_validator, model_validator

from smolvla_ray.keys import camera_name_problem
from smolvla_ray.spec.common import SECTION_CONFIG
from smolvla_ray.spec.common import check_uri as _check_uri


class EpisodeRange(BaseModel):
    """Episodes start, start+1, ..., stop-1 (half-open, like Python's range)."""

    model_config = SECTION_CONFIG
    start: int = Field(ge=0)
    stop: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> EpisodeRange:
        if self.stop <= self.start:
            raise ValueError(
                f"stop={self.stop} must exceed start={self.start} (the range is half-open)"
            )
        return self


class AugmentSpec(BaseModel):
    """Random image augmentation as LeRobot's `image_transforms` (off by default): up to
    `max_num_transforms` of the enabled transforms per image, each with a parameter drawn
    uniformly from its range; applied in the loader processes, drawn per sample from
    (seed, epoch, frame, camera), so resume is exact."""

    model_config = SECTION_CONFIG
    enable: bool = False
    max_num_transforms: int = Field(3, ge=1)
    random_order: bool = False
    brightness: tuple[float, float] | None = (0.8, 1.2)
    contrast: tuple[float, float] | None = (0.8, 1.2)
    saturation: tuple[float, float] | None = (0.5, 1.5)
    hue: tuple[float, float] | None = (-0.05, 0.05)
    sharpness: tuple[float, float] | None = (0.5, 1.5)
    affine_degrees: tuple[float, float] | None = (-5.0, 5.0)
    affine_translate: tuple[float, float] = (0.05, 0.05)
    """Maximum translation as a fraction of width and height (with affine_degrees)."""

    @model_validator(mode="after")
    def _some_transform(self) -> AugmentSpec:
        ranges = [
            self.brightness,
            self.contrast,
            self.saturation,
            self.hue,
            self.sharpness,
            self.affine_degrees,
        ]
        if self.enable and all(r is None for r in ranges):
            raise ValueError("augment.enable is true but every transform is null; enable one")
        for r in ranges:
            if r is not None and r[0] > r[1]:
                raise ValueError(f"augmentation range {list(r)} is reversed; write [low, high]")
        return self


def _check_episodes(value: list[int] | EpisodeRange | None) -> list[int] | EpisodeRange | None:
    if isinstance(value, list):
        if not value:
            raise ValueError("episodes is an empty list; omit it (null) to use all episodes")
        if min(value) < 0:
            raise ValueError(f"episode indices must be >= 0; got {min(value)}")
        if len(set(value)) != len(value):
            dupes = sorted({i for i in value if value.count(i) > 1})
            raise ValueError(f"episodes lists {dupes} more than once; list each once")
    return value


def _check_rename_map(value: dict[str, str]) -> dict[str, str]:
    for source, target in value.items():
        for key in (source, target):
            if not key.startswith("observation."):
                raise ValueError(
                    f"{source!r}: {target!r}: give full observation keys on both sides, "
                    "e.g. {observation.images.top: observation.images.camera1} (only "
                    "observations are renamed)"
                )
    targets = list(value.values())
    doubled = sorted({t for t in targets if targets.count(t) > 1})
    if doubled:
        sources = sorted(k for k, v in value.items() if v in doubled)
        raise ValueError(f"{sources} all map to {doubled}; map each policy key from one key")
    return value


def _check_cameras(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    if not value or not all(name.strip() for name in value):
        raise ValueError("cameras needs non-empty names, e.g. [top, wrist]; null = all")
    for name in value:
        if name.startswith("observation.images."):
            short = name.removeprefix("observation.images.")
            raise ValueError(f"camera {name!r}: give the camera name only, {short!r}")
        problem = camera_name_problem(name)
        if problem:
            raise ValueError(problem)
    if len(set(value)) != len(value):
        raise ValueError(f"cameras {value} names a camera twice; list each once")
    return value


DATASET_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def default_dataset_name(uri: str) -> str:
    """A mixture dataset's default name: the last part of its URI (a hub id's name),
    lower-cased, other characters than a-z 0-9 . _ - as '-'."""
    tail = uri.rstrip("/").split("@")[0].rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return re.sub(r"[^a-z0-9._-]+", "-", tail.lower()).strip("-._")[:63] or "dataset"


class MixtureDatasetSpec(BaseModel):
    """One dataset of a weighted mixture (`data.datasets`): where it is, what of it trains,
    how its cameras map onto the policy's, and how often it is drawn."""

    model_config = SECTION_CONFIG
    name: str | None = None
    """How the mixture names it (logs, checkpoints, `export --dataset`); default: the last
    part of `uri`."""
    uri: str
    """As `data.uri`: a local path, an fsspec URL or a hub dataset id."""
    revision: str | None = None
    """As `data.revision`, for a hub dataset id in `uri`."""
    episodes: list[int] | EpisodeRange | None = None
    """As `data.episodes`."""
    cameras: list[str] | None = None
    """As `data.cameras`."""
    rename_map: dict[str, str] = Field(default_factory=dict)
    """As `data.rename_map`: this dataset's camera keys -> the policy's."""
    weight: float = Field(1.0, gt=0)
    """Relative sampling weight: a mixture epoch draws this dataset with probability
    weight / (sum of the weights)."""

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _check_uri(value) or value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not DATASET_NAME_PATTERN.match(value):
            raise ValueError(
                f"name={value!r} must be 1-63 of a-z 0-9 . _ - starting with a letter or "
                f"digit, e.g. {default_dataset_name(value)!r}"
            )
        return value

    @field_validator("episodes")
    @classmethod
    def _episodes(cls, value: list[int] | EpisodeRange | None) -> list[int] | EpisodeRange | None:
        return _check_episodes(value)

    @field_validator("rename_map")
    @classmethod
    def _rename_map(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_rename_map(value)

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, value: list[str] | None) -> list[str] | None:
        return _check_cameras(value)

    @property
    def resolved_name(self) -> str:
        """`name`, or the default from `uri`."""
        return self.name or default_dataset_name(self.uri)


_SINGLE_DATASET_FIELDS = ("uri", "revision", "episodes", "cameras", "rename_map")


class DataSpec(BaseModel):
    """The LeRobot dataset (v3.0 or v2.1) to train on, or a weighted mixture of several
    (`datasets`), and how workers read it."""

    model_config = SECTION_CONFIG
    uri: str | None = None
    """Dataset root: a local path, any fsspec URL (s3://bucket/datasets/name), or a hub id
    (lerobot/pusht, short for hf://datasets/lerobot/pusht). Required unless `datasets`."""
    revision: str | None = None
    """Hub branch, tag or commit of a hub dataset id in `uri` (None = main)."""
    episodes: list[int] | EpisodeRange | None = None
    """Episode indices [0, 3, 7] or a range {start: 0, stop: 40}; None = all episodes."""
    cameras: list[str] | None = None
    """Camera names (['top', 'wrist'] for observation.images.top/...); None = all."""
    rename_map: dict[str, str] = Field(default_factory=dict)
    """Dataset camera key -> policy camera key, as LeRobot's `rename_map`, for a pretrained
    policy whose cameras have other names, e.g. {observation.images.top:
    observation.images.camera1}. Applied after `cameras` picks the dataset's cameras."""
    datasets: list[MixtureDatasetSpec] | None = None
    """A weighted mixture of two or more datasets instead of `uri` (docs/datasets.md,
    "Dataset mixtures"); each has its own uri, revision, episodes, cameras, rename_map and
    weight. None: the one dataset of `uri`."""
    epoch_samples: int | None = Field(None, ge=1)
    """Samples in one epoch of a mixture; None = the datasets' selected frames together."""
    num_loader_workers: int = Field(2, ge=0)
    """Background decode processes per Ray worker (0 = decode in the training process)."""
    cache_dir: str | None = None
    """Node-local cache of remote videos and feature-cache shards; None = $SMOLVLA_RAY_CACHE,
    else ~/.cache/smolvla_ray."""
    cache_max_bytes: ByteSize = Field(ByteSize(20 * 1024**3), ge=1)
    """Size bound of each node-local cache (videos, feature shards; least recently used
    files evicted) in bytes, or a string like 20GiB / 500MB."""
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    feature_cache: Literal["auto", "on", "off"] = "auto"
    """Precompute the frozen vision encoder's output once and train from it: auto = when
    the features are constant (vision encoder frozen, no augmentation) and all of it fits
    cache_max_bytes, on = required (error otherwise; beyond cache_max_bytes evicted shards
    are downloaded again), off = decode video and run the encoder every step."""
    feature_cache_dtype: Literal["float32", "bfloat16"] = "float32"
    """float32 keeps losses equal to training from video; bfloat16 halves the cache."""

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return _check_uri(value)

    @field_validator("feature_cache", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads unquoted on/off (as the docs write them) as true/false.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("episodes")
    @classmethod
    def _episodes(cls, value: list[int] | EpisodeRange | None) -> list[int] | EpisodeRange | None:
        return _check_episodes(value)

    @field_validator("rename_map")
    @classmethod
    def _rename_map(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_rename_map(value)

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, value: list[str] | None) -> list[str] | None:
        return _check_cameras(value)

    @model_validator(mode="after")
    def _one_or_mixture(self) -> DataSpec:
        if self.datasets is None:
            if self.uri is None:
                raise ValueError(
                    "data needs a dataset: uri (one dataset) or datasets (a weighted "
                    "mixture, e.g. datasets: [{uri: ./a}, {uri: ./b}])"
                )
            if self.epoch_samples is not None:
                raise ValueError(
                    f"data.epoch_samples={self.epoch_samples} sets the length of a mixture's "
                    "epoch, but data has one dataset (uri); remove it"
                )
            return self
        # By value, not by what was set: a dumped spec (checkpoints, Ray) holds the defaults.
        given = [f for f in _SINGLE_DATASET_FIELDS if getattr(self, f)]
        if given:
            raise ValueError(
                f"data.datasets (a mixture) and data.{', data.'.join(given)} exclude each "
                "other: give each dataset's uri, revision, episodes, cameras and rename_map "
                "inside its data.datasets entry"
            )
        if len(self.datasets) < 2:
            raise ValueError(
                f"data.datasets lists {len(self.datasets)} dataset; a mixture needs two or "
                "more (for one dataset use data.uri)"
            )
        names = [d.resolved_name for d in self.datasets]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(
                f"data.datasets names {doubled} more than once (names default to the last "
                "part of uri); give each entry a distinct name"
            )
        return self

    @property
    def is_mixture(self) -> bool:
        """Whether this is a mixture of datasets (`datasets`) rather than one (`uri`)."""
        return self.datasets is not None

    @property
    def primary_uri(self) -> str:
        """`uri`, or the first mixture dataset's."""
        if self.datasets is not None:
            return self.datasets[0].uri
        return str(self.uri)
