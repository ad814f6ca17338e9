"""Building the frozen-feature cache: a Ray pass over the dataset's episodes.

The driver decides whether the cache applies (`data.feature_cache` and whether the features
are constant) and computes the key without building the model (from the resolved config and
the weights' safetensors file), and starts one Ray task per group of missing episodes (GPU
tasks when the run uses GPUs). Each task builds the policy as the workers will, decodes its
episodes once, runs the frozen vision encoder + connector, and uploads a shard per episode.
A build interrupted part-way keeps its shards; a complete cache is reused as it is.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from smolvla_ray.cache.store import (
    COMPLETE,
    KEY_FILE,
    CacheStore,
    cache_key,
    key_inputs,
)
from smolvla_ray.data.storage import Storage, node_cache_dir
from smolvla_ray.keys import FEATURES_SUFFIX
from smolvla_ray.policy.config import PolicyConfig
from smolvla_ray.policy.freezing import trainable_image_towers
from smolvla_ray.run_layout import cache_root
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import JobSpec
from smolvla_ray.waits import ResourceWaitTimeout, resource_message, show_resources

if TYPE_CHECKING:
    from smolvla_ray.data.meta import DatasetMeta
    from smolvla_ray.features import FeatureResolution
    from smolvla_ray.policy.adapters import LoraSettings
    from smolvla_ray.policy.modeling import SmolVLAPolicy

ENCODE_BATCH = 32
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def feature_bytes_per_image(config: PolicyConfig, dtype: str) -> int:
    """Bytes of one camera image's cached features: the connector's tokens per image x the
    text model's width x the storage dtype's size, from the VLM's config alone (LeRobot's
    SmolVLM2-500M: 64 tokens x 960 x 4 bytes = 245,760)."""
    from smolvla_ray.policy.backbone import load_vlm_config

    vlm = load_vlm_config(config.vlm_model_name)
    patches = (vlm.vision_config.image_size // vlm.vision_config.patch_size) ** 2
    tokens = patches // vlm.scale_factor**2
    return tokens * vlm.text_config.hidden_size * DTYPE_BYTES[dtype]


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@dataclass(frozen=True)
class CachePlan:
    """How big the feature cache is, from the dataset's metadata alone, and how each node
    can hold it: whole when it fits `data.cache_max_bytes` and the free disk under
    `data.cache_dir` (this node's, standing for the others), else (`on` only) through a
    least-recently-used copy bounded by `data.cache_max_bytes`."""

    frames: int
    episodes: int
    longest_episode: int  # frames of the run's longest episode: its shard is the largest
    cameras: int
    bytes_per_image: int
    dtype: str
    max_bytes: int
    free_bytes: int
    cache_dir: str
    parts: tuple[tuple[str, CachePlan], ...] = ()
    """A mixture's plan (`combine_plans`): each dataset's own cache by name; the bound and
    the disk hold them all together."""

    @property
    def total_bytes(self) -> int:
        if self.parts:
            return sum(p.total_bytes for _, p in self.parts)
        return self.frames * self.cameras * self.bytes_per_image

    @property
    def largest_shard_bytes(self) -> int:
        if self.parts:
            return max(p.largest_shard_bytes for _, p in self.parts)
        return self.longest_episode * self.cameras * self.bytes_per_image

    @property
    def problem(self) -> str | None:
        """Why a whole copy per node does not fit (None when it does)."""
        if self.total_bytes > self.max_bytes:
            return f"it exceeds data.cache_max_bytes={_size(self.max_bytes)}"
        if self.total_bytes > self.free_bytes:
            return f"it exceeds the {_size(self.free_bytes)} free under {self.cache_dir}"
        return None

    @property
    def bounded_problem(self) -> str | None:
        """Why even the bounded copy cannot work (None when it can), with the fix: it must
        hold the largest episode's shard, and fill at most the free disk."""
        largest = self.largest_shard_bytes
        if largest > self.max_bytes:
            return (
                f"one episode's shard ({_size(largest)}) exceeds data.cache_max_bytes="
                f"{_size(self.max_bytes)}: raise data.cache_max_bytes above it"
            )
        held = min(self.total_bytes, self.max_bytes)
        if held > self.free_bytes:
            return (
                f"a node's copy of up to {_size(held)} exceeds the {_size(self.free_bytes)} free "
                f"under {self.cache_dir}: free disk there, or lower data.cache_max_bytes to at "
                f"most {_size(self.free_bytes)}"
            )
        return None

    def line(self) -> str:
        if self.parts:
            each = "; ".join(f"dataset {name}: {p.line()}" for name, p in self.parts)
            return f"{each}; {_size(self.total_bytes)} in all"
        return (
            f"{self.frames:,} frames x {self.cameras} camera(s) x {self.bytes_per_image:,} "
            f"bytes ({self.dtype}) = {_size(self.total_bytes)}"
        )

    def bounded_cost(self) -> str:
        """What training through the bounded copy costs. Samples are shuffled over the whole
        run, so a least-recently-used copy holding a fraction f of the cache hits about f
        of the reads; every other read downloads its episode's whole shard again."""
        miss = 1 - self.max_bytes / self.total_bytes
        per_read = self.total_bytes / self.episodes
        return (
            f"every node keeps at most data.cache_max_bytes={_size(self.max_bytes)} of it and "
            f"downloads evicted episode shards again when read: about {miss:.0%} of the "
            f"reads, ~{_size(per_read)} each, ~{_size(miss * per_read * self.frames)} per "
            "epoch, which can be slower than decoding video"
        )


def plan_cache(
    config: PolicyConfig,
    *,
    episode_frames: Sequence[int],
    cameras: int,
    dtype: str,
    max_bytes: int,
    cache_dir: Path,
) -> CachePlan:
    """The plan for the run's episodes, of `episode_frames` frames each."""
    existing = cache_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return CachePlan(
        frames=sum(episode_frames),
        episodes=len(episode_frames),
        longest_episode=max(episode_frames),
        cameras=cameras,
        bytes_per_image=feature_bytes_per_image(config, dtype),
        dtype=dtype,
        max_bytes=max_bytes,
        free_bytes=shutil.disk_usage(existing).free,
        cache_dir=str(cache_dir),
    )


def combine_plans(plans: Mapping[str, CachePlan]) -> CachePlan:
    """A mixture's plan: one cache per dataset (by name, in the spec's order), sized and
    bounded together, since every node holds all of them under one `data.cache_max_bytes`."""
    first = next(iter(plans.values()))
    return replace(
        first,
        frames=sum(p.frames for p in plans.values()),
        episodes=sum(p.episodes for p in plans.values()),
        longest_episode=max(p.longest_episode for p in plans.values()),
        parts=tuple(plans.items()),
    )


def say(message: str) -> None:
    sys.stderr.write(f"[smolvla-ray] {message}\n")
    sys.stderr.flush()


def encode_episodes(
    settings: RunSettings,
    storage_options: Mapping[str, Any],
    root: str,
    episodes: list[int],
    *,
    dataset: str | None = None,
) -> dict[str, float]:
    """Ray task body: encode and upload the shards of `episodes` (of mixture dataset
    `dataset`, by name; None: the run's one dataset), building the policy as the workers do
    (from the run's settings); returns timing."""
    from smolvla_ray.build import build_policy, open_dataset, open_mixture

    device = torch.device("cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu")
    meta = open_dataset(settings, storage_options=storage_options)
    metas = open_mixture(settings, storage_options=storage_options)
    policy = build_policy(settings, meta, storage_options=storage_options, metas=metas or None)
    policy = policy.to(device).eval()
    resolution = policy.feature_resolution
    if dataset is not None:  # a mixture's dataset: its own cameras, as it feeds the policy
        meta, resolution = metas[dataset], resolution.datasets[dataset]
    return _encode(settings, policy, meta, resolution.sources, device, root, episodes,
                   storage_options=storage_options)  # fmt: skip


def _encode(
    settings: RunSettings,
    policy: SmolVLAPolicy,
    meta: DatasetMeta,
    sources: Mapping[str, str],
    device: torch.device,
    root: str,
    episodes: list[int],
    *,
    storage_options: Mapping[str, Any],
) -> dict[str, float]:
    from smolvla_ray.data.samples import FrameDataset

    dtype = getattr(torch, settings.data.feature_cache_dtype)
    # The training step's precision: a bf16 run encodes its frames live under bf16 autocast,
    # so its cache does too (the key says which, `encode_precision`).
    autocast = settings.train.precision == "bf16"
    store = CacheStore(root, storage_options)
    # Shards hold the cameras under the policy's keys, each encoded from its renamed source.
    start, frames = time.perf_counter(), 0
    for episode in episodes:
        dataset = FrameDataset(
            meta,
            episodes=[episode],
            cameras=list(sources.values()),
            chunk_size=1,
            storage_options=storage_options,
        )
        outputs: dict[str, list[torch.Tensor]] = {}
        for first in range(0, len(dataset), ENCODE_BATCH):
            rows = range(first, min(first + ENCODE_BATCH, len(dataset)))
            samples = [dataset[i] for i in rows]
            batch = {
                key: torch.stack([s[source] for s in samples]).to(device)
                for key, source in sources.items()
            }
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                encoded = policy.encode_images(batch)
            for key, value in encoded.items():
                outputs.setdefault(key.removesuffix(FEATURES_SUFFIX), []).append(
                    value.float().to("cpu")
                )
        store.write_shard(episode, {k: torch.cat(v).to(dtype) for k, v in outputs.items()})
        frames += len(dataset)
    return {"frames": frames, "seconds": time.perf_counter() - start}


def vision_blocker(config: PolicyConfig) -> str | None:
    """Why the image tokens are not constant under `config`'s freezing overrides (None when
    the vision encoder and connector are both frozen), by `apply_requires_grad`'s rules."""
    trainable = trainable_image_towers(
        freeze_vision_encoder=config.freeze_vision_encoder,
        train_expert_only=config.train_expert_only,
    )
    if not trainable:
        return None
    return (
        f"the policy's {' and '.join(trainable)} {'train' if len(trainable) > 1 else 'trains'} "
        f"(freeze_vision_encoder={config.freeze_vision_encoder}, train_expert_only="
        f"{config.train_expert_only} after the checkpoint's config and the spec's overrides)"
    )


def towers_adapted_by(policy_config: PolicyConfig, settings: LoraSettings) -> list[str]:
    """`adapted_towers` of the policy `policy_config` describes with `settings`' adapters,
    found on the meta device (no memory, no weights): the driver's cache decision."""
    from smolvla_ray.policy.adapters import adapted_towers, add_adapters
    from smolvla_ray.policy.modeling import SmolVLAPolicy

    with torch.device("meta"):
        policy = SmolVLAPolicy(policy_config, fetch_vlm_weights=False)
        add_adapters(policy, settings)
    return adapted_towers(policy)


def adapter_blocker(settings: RunSettings, config: PolicyConfig) -> str | None:
    """With LoRA the whole base is frozen, so the image tokens are constant unless an adapter
    or a full-training module sits in the vision encoder or connector (found by injecting
    the adapters into the policy on the meta device: PEFT's own matching, no weights)."""
    from smolvla_ray.build import lora_settings

    lora = lora_settings(settings)
    assert lora is not None
    towers = towers_adapted_by(config, lora)
    if not towers:
        return None
    return (
        f"policy.peft adapts the policy's {' and '.join(towers)} (its target_modules or "
        "full_training_modules reach them), so the image tokens change as it trains"
    )


def _run_encode_tasks(
    spec: JobSpec,
    storage_options: Mapping[str, Any],
    root: str,
    missing: list[int],
    *,
    dataset: str | None = None,
) -> list[dict[str, float]]:
    """Encode `missing` in up to num_workers Ray tasks, one GPU (or CPU) each. Their
    resources are reserved first, as a placement group that must be granted within
    `failure.resource_wait_s` (the trainer's bound and message): a task asking for a GPU
    no node has would otherwise leave the driver waiting forever."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    groups = max(1, min(spec.scaling.num_workers, len(missing)))
    bundle = {"CPU": 1, "GPU": 1} if spec.scaling.use_gpu else {"CPU": 1}
    reserved = placement_group([bundle] * groups, strategy="SPREAD")
    try:
        if not reserved.wait(timeout_seconds=max(spec.failure.resource_wait_s, 1.0)):
            raise ResourceWaitTimeout(
                resource_message(
                    wait_s=spec.failure.resource_wait_s,
                    whose="the feature-cache build's",
                    asks=f"it asks {groups} task(s) x {show_resources(bundle)}",
                    fix="lower scaling.num_workers, or set data.feature_cache: off",
                )
            )
        task = ray.remote(num_cpus=1, num_gpus=bundle.get("GPU", 0))(encode_episodes)
        settings = RunSettings.from_spec(spec)
        options_ref = ray.put(dict(storage_options))
        refs = [
            task.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    reserved, placement_group_bundle_index=i
                )
            ).remote(settings, options_ref, root, missing[i::groups], dataset=dataset)
            for i in range(groups)
        ]
        return ray.get(refs)
    finally:
        remove_placement_group(reserved)


@dataclass(frozen=True)
class CachePart:
    """One cache of the run: the run's dataset, or one dataset of a mixture (`name`), with
    its own resolution against the policy and the episodes it holds."""

    name: str | None
    meta: DatasetMeta
    resolution: FeatureResolution
    episodes: list[int]

    def key_config(self, config: PolicyConfig) -> PolicyConfig:
        """`config` as this part's shards see it. A mixture's dataset keys only the cameras
        it feeds (its shards hold no others), so another dataset joining the mixture with
        a new camera leaves its cache as it is."""
        if self.name is None:
            return config
        fed = self.resolution.sources
        inputs = {k: f for k, f in config.input_features.items() if f.type != "VISUAL" or k in fed}
        return config.model_copy(update={"input_features": inputs})


def cache_parts(
    settings: RunSettings, meta: DatasetMeta, resolution: FeatureResolution, metas
) -> list[CachePart]:
    """The run's caches: one for its dataset, or one per mixture dataset, in the spec's
    order (`metas`: the mixture's metadata by name)."""
    from smolvla_ray.build import cached_episodes, mixture_episodes

    if settings.data.mixture is None:
        return [CachePart(None, meta, resolution, cached_episodes(settings, meta))]
    episodes = mixture_episodes(settings, metas)
    return [
        CachePart(d.name, metas[d.name], resolution.datasets[d.name], episodes[d.name])
        for d in settings.data.mixture
    ]


def ensure_feature_cache(
    spec: JobSpec, storage_options: Mapping[str, Any]
) -> str | dict[str, str] | None:
    """The cache root to train from, building what is missing; None when not used. For a
    mixture, each dataset's own cache root by name (all of them, or none)."""
    mode = spec.data.feature_cache
    if mode == "off":
        return None
    from smolvla_ray.build import open_dataset, open_mixture, resolve_dataset_features

    settings = RunSettings.from_spec(spec)
    blocker = spec.feature_cache_blocker()
    if blocker is None:
        # Model-free: the resolved config (a checkpoint's config.json with the spec's
        # updates) decides, and the weights' files key the cache; only the tasks build it.
        meta = open_dataset(settings, storage_options=storage_options)
        metas = open_mixture(settings, storage_options=storage_options)
        config, resolution = resolve_dataset_features(
            settings, meta, storage_options=storage_options, metas=metas or None
        )
        blocker = (
            vision_blocker(config)
            if settings.policy.peft is None
            else adapter_blocker(settings, config)
        )
    if blocker is not None:
        if mode == "on":
            raise ValueError(f"data.feature_cache='on' but {blocker}; use auto or off")
        say(f"feature cache not used: {blocker}")
        return None
    parts = cache_parts(settings, meta, resolution, metas)
    plans = {
        part.name or "": plan_cache(
            config,
            episode_frames=[part.meta.episodes[e].length for e in part.episodes],
            cameras=len(part.resolution.sources),
            dtype=spec.data.feature_cache_dtype,
            max_bytes=int(spec.data.cache_max_bytes),
            cache_dir=node_cache_dir(spec.data.cache_dir),
        )
        for part in parts
    }
    plan = combine_plans(plans) if settings.data.mixture is not None else plans[""]
    fix = (
        "raise data.cache_max_bytes (and the nodes' disk), or set "
        "data.feature_cache_dtype: bfloat16 to halve it"
    )
    whole = "a whole copy of each on every node" if plan.parts else "a whole copy on every node"
    if plan.problem is None:
        say(f"feature cache: {plan.line()}, {whole}")
    elif mode == "auto":
        say(
            f"feature cache not used: {plan.line()}; {plan.problem} ({fix}); training decodes video"
        )
        return None
    elif plan.bounded_problem is not None:
        raise ValueError(
            f"data.feature_cache='on' but the cache is too big: {plan.line()}; "
            f"{plan.bounded_problem}; or set data.feature_cache to auto or off"
        )
    else:
        local = Storage(spec.checkpoint.storage, storage_options).is_local
        cost = "training reads it in place (local storage)" if local else plan.bounded_cost()
        say(
            f"warning: feature cache over its bound: {plan.line()}; {plan.problem}. As "
            f"data.feature_cache is on, {cost}. To hold it whole, {fix} (auto would train "
            "from video)"
        )
    roots = {
        part.name: _ensure_part(spec, settings, config, part, storage_options) for part in parts
    }
    return roots[None] if settings.data.mixture is None else roots  # type: ignore[return-value]


def _ensure_part(
    spec: JobSpec,
    settings: RunSettings,
    config: PolicyConfig,
    part: CachePart,
    storage_options: Mapping[str, Any],
) -> str:
    """One cache's root, its missing episodes encoded in Ray tasks."""
    inputs = key_inputs(
        settings, part.key_config(config), part.resolution, part.meta,
        storage_options=storage_options,
    )  # fmt: skip
    root = cache_root(spec.checkpoint.storage, cache_key(inputs))
    whose = f" (dataset {part.name})" if part.name is not None else ""
    store = CacheStore(root, storage_options)
    present = store.shards()
    missing = [e for e in part.episodes if e not in present]
    if not missing:
        say(f"using feature cache {root}{whose}")
        return root
    say(
        f"building feature cache {root}{whose}: {len(missing)} of {len(part.episodes)} "
        "episodes to encode"
    )
    store.write_json(KEY_FILE, inputs)
    stats = _run_encode_tasks(spec, storage_options, root, missing, dataset=part.name)
    frames = sum(s["frames"] for s in stats)
    seconds = sum(s["seconds"] for s in stats)
    say(
        f"feature cache built: {frames} frames in {seconds:.1f} task-seconds "
        f"({seconds / max(frames, 1) * 1000:.1f} ms per frame)"
    )
    episodes = len(part.meta.episodes)
    if len(store.shards()) == episodes:
        store.write_json(COMPLETE, {"episodes": episodes})
    return root
