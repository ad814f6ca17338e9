"""Building the two things a run is made of, from its settings (`settings.RunSettings`): the
policy (its overrides and the dataset's resolved features, with a processor for the dataset)
and the dataset's metadata, and the run's episodes. Neutral ground: the trainer, the
feature-cache build and the driver's preflight use it, and it imports none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from smolvla_ray.data.meta import DatasetMeta, load_meta, select_episodes
from smolvla_ray.data.split import split_by_task
from smolvla_ray.features import (
    FeatureResolution,
    base_config,
    dataset_resolution,
    read_pretrained_config,
    resolve_features,
    resolve_mixture,
)
from smolvla_ray.policy.config import PolicyConfig
from smolvla_ray.settings import RunSettings

if TYPE_CHECKING:
    from smolvla_ray.policy.modeling import SmolVLAPolicy


def resolve_run_features(
    settings: RunSettings,
    pretrained_config_json: str | None,
    dataset_features: Mapping[str, Mapping[str, Any]],
    *,
    mixture_features: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> tuple[PolicyConfig, FeatureResolution]:
    """(the policy config to build, its feature resolution) for the run, from the policy's
    `config.json` text (None for a preset) and the dataset's `info.json` features; for a
    mixture, from each dataset's features by name (`mixture_features`), each resolved
    against the policy on its own and then merged (`features.resolve_mixture`)."""
    policy = settings.policy
    base = base_config(
        pretrained_config_json,
        preset=policy.preset,
        pretrained=policy.pretrained,
        updates=policy.config_updates,
    )
    policy_source = f"policy {policy.pretrained or 'preset ' + str(policy.preset)}"
    if settings.data.mixture is not None:
        if mixture_features is None:
            raise RuntimeError("a mixture's features need every dataset's info.json features")
        resolutions = {
            d.name: resolve_features(
                base,
                mixture_features[d.name],
                rename_map=d.rename_map,
                cameras=d.cameras,
                policy_source=policy_source,
                dataset_source=f"dataset {d.name} ({d.uri}; data.datasets)",
            )
            for d in settings.data.mixture
        }
        resolution = resolve_mixture(resolutions)
        return resolution.apply(base), resolution
    resolution = resolve_features(
        base,
        dataset_features,
        rename_map=settings.data.rename_map,
        cameras=settings.data.cameras,
        policy_source=policy_source,
        dataset_source=f"dataset {settings.data.uri}",
    )
    return resolution.apply(base), resolution


def resolve_dataset_features(
    settings: RunSettings,
    meta: DatasetMeta,
    *,
    storage_options: Mapping[str, Any],
    metas: Mapping[str, DatasetMeta] | None = None,
) -> tuple[PolicyConfig, FeatureResolution]:
    """The policy config to build and how the dataset's features feed it (the driver's
    preflight, every worker and the feature-cache build give the same answer, from the same
    two JSON files). A mixture's datasets are opened unless `metas` holds them."""
    text = None
    if settings.policy.pretrained:
        text = read_pretrained_config(
            settings.policy.pretrained, storage_options, revision=settings.policy.revision
        )
    mixture = None
    if settings.data.mixture is not None:
        metas = metas or open_mixture(settings, storage_options=storage_options)
        mixture = {name: m.features for name, m in metas.items()}
    return resolve_run_features(settings, text, meta.features, mixture_features=mixture)


def build_policy(
    settings: RunSettings,
    meta: DatasetMeta,
    *,
    storage_options: Mapping[str, Any],
    metas: Mapping[str, DatasetMeta] | None = None,
) -> SmolVLAPolicy:
    """The policy with the run's overrides and the dataset's resolved features, with a
    processor that renames the dataset's keys and normalizes with its statistics. For a
    mixture (its datasets opened unless `metas` holds them), `policy.processor` is the
    first dataset's and `policy.mixture_processors` holds every dataset's by name, each
    with its own statistics, rename map and widths (`mixture_processors`)."""
    # Imported here: the driver uses this module's light helpers before Ray starts, and
    # the model's imports (torch, transformers) would cost it seconds on every run.
    import torch

    from smolvla_ray.policy.modeling import SmolVLAPolicy
    from smolvla_ray.policy.processor import PolicyProcessor

    if settings.data.mixture is not None:
        metas = metas or open_mixture(settings, storage_options=storage_options)
    config, resolution = resolve_dataset_features(
        settings, meta, storage_options=storage_options, metas=metas
    )
    policy_settings = settings.policy
    if policy_settings.pretrained:
        policy = SmolVLAPolicy.from_pretrained(
            policy_settings.pretrained,
            prefix_mode=policy_settings.prefix_mode,
            config_overrides=config.model_dump(),
            revision=policy_settings.revision,
            **storage_options,
        )
    else:
        # Every worker seeds the same way, so random-init backbones agree (and are checked).
        torch.manual_seed(settings.train.seed)
        policy = SmolVLAPolicy(config, prefix_mode=policy_settings.prefix_mode)
    if policy_settings.peft is not None:
        add_lora(policy, settings)
    policy.feature_resolution = resolution
    if metas is not None and resolution.datasets:
        processors = mixture_processors(policy.config, resolution, metas)
        policy.mixture_processors = processors
        policy.processor = next(iter(processors.values()))
        return policy
    policy.processor = PolicyProcessor(policy.config, meta.stats, resolution.rename_map)
    return policy


def mixture_processors(
    config: PolicyConfig, resolution: FeatureResolution, metas: Mapping[str, DatasetMeta]
) -> dict:  # -> dict[str, PolicyProcessor]
    """Each mixture dataset's processor by name: its own statistics and rename map, for a
    config with its own cameras and widths (what an export for it carries)."""
    from smolvla_ray.policy.processor import PolicyProcessor

    return {
        name: PolicyProcessor(
            dataset_resolution(resolution, name).apply(config), metas[name].stats, own.rename_map
        )
        for name, own in resolution.datasets.items()
    }


def lora_settings(settings: RunSettings):  # -> policy.adapters.LoraSettings | None
    """The run's `policy.peft` as the policy's adapter settings (None without adapters)."""
    if settings.policy.peft is None:
        return None
    from smolvla_ray.policy.adapters import settings_from_options

    return settings_from_options(settings.policy.peft)


def add_lora(policy: SmolVLAPolicy, settings: RunSettings) -> None:
    """The run's LoRA adapters on `policy` (the whole base frozen), initialized from the
    run's seed so every worker and every rebuild starts from the same adapters; the
    adapters' base, for saving them, is the run's pretrained policy at its pinned commit."""
    from smolvla_ray import hub
    from smolvla_ray.policy.adapters import add_adapters

    lora, pretrained = lora_settings(settings), settings.policy.pretrained
    if lora is None or pretrained is None:
        raise RuntimeError("add_lora needs policy.peft and policy.pretrained (the spec checks)")
    add_adapters(policy, lora, seed=settings.train.seed)
    commit = hub.model_commit(pretrained, settings.policy.revision)
    policy.adapter_base = (pretrained, commit or settings.policy.revision)


def _selected(settings: RunSettings, meta: DatasetMeta) -> list[int]:
    """`data.episodes` checked against the dataset (all episodes when unset)."""
    return select_episodes(meta, settings.data.episodes)  # positions are episode indices


def eval_episodes(settings: RunSettings, meta: DatasetMeta) -> list[int]:
    """The held-out episodes, in order ([] without an eval section): `eval.episodes`, which
    must lie within `data.episodes`, else LeRobot's per-task split of the selection."""
    if settings.eval is None:
        return []
    selected = _selected(settings, meta)
    explicit = settings.eval.episodes
    if explicit is None:
        return split_by_task(meta, selected, settings.eval.split)
    try:
        chosen = select_episodes(meta, explicit)
    except ValueError as err:
        raise ValueError(f"eval.episodes: {err}") from None
    outside = sorted(set(chosen) - set(selected))
    if outside:
        raise ValueError(f"eval.episodes {outside} are not among data.episodes")
    return chosen


def run_episodes(settings: RunSettings, meta: DatasetMeta) -> list[int]:
    """The episode indices the run trains on, in order: the selection minus the held-out
    episodes. One answer for the loader and the checks, so a held-out frame never reaches a
    training batch."""
    held = set(eval_episodes(settings, meta))
    train = [e for e in _selected(settings, meta) if e not in held]
    if not train:
        raise ValueError(
            f"the eval section holds out every selected episode ({len(held)}); lower "
            "eval.split, list fewer eval.episodes, or select more data.episodes"
        )
    return train


def cached_episodes(settings: RunSettings, meta: DatasetMeta) -> list[int]:
    """The episodes whose vision features the feature cache holds: training and held-out,
    in episode order (evaluations read the cache too). One answer for the cache's build,
    sizing and node copy, so they never disagree on which shards a run reads."""
    return sorted(run_episodes(settings, meta) + eval_episodes(settings, meta))


def open_dataset(settings: RunSettings, *, storage_options: Mapping[str, Any]) -> DatasetMeta:
    """The dataset's metadata (a mixture's first dataset's); a hub id is read from this
    node's Hugging Face cache when it holds the snapshot, else from the Hub at the pinned
    revision."""
    from smolvla_ray import hub

    url = hub.dataset_url(settings.data.uri, settings.data.revision)
    return load_meta(url, storage_options=storage_options)


def open_mixture(
    settings: RunSettings, *, storage_options: Mapping[str, Any]
) -> dict[str, DatasetMeta]:
    """Each mixture dataset's metadata by name, in the spec's order ({} for one dataset)."""
    from smolvla_ray import hub

    return {
        d.name: load_meta(hub.dataset_url(d.uri, d.revision), storage_options=storage_options)
        for d in settings.data.mixture or ()
    }


def mixture_episodes(
    settings: RunSettings, metas: Mapping[str, DatasetMeta]
) -> dict[str, list[int]]:
    """Each mixture dataset's selected episodes by name (`episodes` checked against it):
    training and held-out together, what its feature cache holds."""
    out = {}
    for d in settings.data.mixture or ():
        try:
            out[d.name] = select_episodes(metas[d.name], d.episodes)
        except ValueError as err:
            raise ValueError(f"data.datasets {d.name!r} episodes: {err}") from None
    return out


def mixture_eval_episodes(
    settings: RunSettings, metas: Mapping[str, DatasetMeta]
) -> dict[str, list[int]]:
    """Each mixture dataset's held-out episodes by name, in order (all [] without an eval
    section): LeRobot's per-task split of its own selection, by `eval.split`."""
    selected = mixture_episodes(settings, metas)
    if settings.eval is None:
        return {name: [] for name in selected}
    if settings.eval.episodes is not None:  # the spec refuses it; settings may be built by hand
        raise RuntimeError("eval.episodes names one dataset's episodes, not a mixture's")
    return {
        name: split_by_task(metas[name], episodes, settings.eval.split)
        for name, episodes in selected.items()
    }


def mixture_run_episodes(
    settings: RunSettings, metas: Mapping[str, DatasetMeta]
) -> dict[str, list[int]]:
    """Each mixture dataset's training episodes by name, in order: its selection minus its
    held-out episodes. One answer for the loader and the checks, so a held-out frame never
    reaches a training batch."""
    held = mixture_eval_episodes(settings, metas)
    out = {}
    for name, selected in mixture_episodes(settings, metas).items():
        kept = set(held[name])
        out[name] = [e for e in selected if e not in kept]
        if not out[name]:
            raise ValueError(
                f"the eval section holds out every selected episode of data.datasets "
                f"{name!r} ({len(held[name])}: eval.split takes at least one episode of each "
                "task); lower eval.split, or select more episodes of that dataset"
            )
    return out
