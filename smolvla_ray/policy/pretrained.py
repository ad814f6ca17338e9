"""LeRobot `pretrained_model/` directories in and out, at a local path or any fsspec URL.

The layout is LeRobot 0.6.1's: `config.json`, `model.safetensors` (every tensor, float32,
LeRobot's key names) and the processor files; or, for a PEFT adapter (`use_peft: true`),
`adapter_config.json` naming the base policy and `adapter_model.safetensors` in place of the
weights, loaded on top of that base as LeRobot's `make_policy` does (`policy/adapters.py`).
Loading is strict where LeRobot is lenient: a missing or unexpected tensor is an error that
names it, since a silently random-initialized layer is the worst kind of bug in a finetune.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from smolvla_ray.policy.adapters import is_adapter_dir
from smolvla_ray.policy.config import PolicyConfig
from smolvla_ray.policy.processor import PRE_STATE, PolicyProcessor
from smolvla_ray.policy.weights_file import CONFIG_NAME, WEIGHTS_NAME, check_state_dict_keys
from smolvla_ray.storage import filesystem

if TYPE_CHECKING:  # the model module calls into this one (SmolVLAPolicy.from_pretrained)
    from smolvla_ray.policy.modeling import PrefixMode, SmolVLAPolicy

log = logging.getLogger(__name__)


def _is_url(source: str) -> bool:
    return "://" in source


def _looks_like_hub_id(source: str) -> bool:
    from smolvla_ray.hub import is_hub_id

    return is_hub_id(source)


def fetch_pretrained(
    source: str, cache_dir: str | Path, *, revision: str | None = None, **storage_options
) -> Path:
    """A local directory holding `source`'s files: the path itself, a copy of a remote
    fsspec directory into `cache_dir`, or a hub id's snapshot at `revision` in the Hugging
    Face cache (fetched once per node; see `smolvla_ray.hub`)."""
    if not _is_url(source):
        local = Path(source).expanduser()
        if local.is_dir():
            return local
        if _looks_like_hub_id(source):
            from smolvla_ray import hub

            return hub.model_snapshot(source, revision=revision)
        raise FileNotFoundError(f"pretrained policy directory {source!r} does not exist")
    fs, root = filesystem(source, storage_options)
    if not fs.exists(f"{root}/{CONFIG_NAME}"):
        raise FileNotFoundError(f"{source}/{CONFIG_NAME} does not exist")
    target = Path(cache_dir)
    target.mkdir(parents=True, exist_ok=True)
    for name in fs.ls(root, detail=False):
        fs.get(name, str(target / Path(name).name))
    return target


def load_pretrained(
    policy_class: type[SmolVLAPolicy],
    source: str,
    *,
    prefix_mode: PrefixMode = "auto",
    config_overrides: dict | None = None,
    revision: str | None = None,
    **storage_options,
) -> SmolVLAPolicy:
    """Build a `policy_class` from a LeRobot `pretrained_model/` (path, fsspec URL or hub id
    at `revision`, a branch, tag or commit; None = main). Use `SmolVLAPolicy.from_pretrained`."""
    with tempfile.TemporaryDirectory(prefix="smolvla-pretrained-") as tmp:
        directory = fetch_pretrained(source, tmp, revision=revision, **storage_options)
        config_path = directory / CONFIG_NAME
        if not config_path.exists():
            raise FileNotFoundError(f"{source}: no {CONFIG_NAME}")
        config = PolicyConfig.from_lerobot_json(config_path.read_text(), source=str(config_path))
        if config_overrides:
            config = PolicyConfig.model_validate({**config.model_dump(), **config_overrides})
        if is_adapter_dir(directory):
            return _load_adapter(
                policy_class, source, directory, config, prefix_mode=prefix_mode,
                storage_options=storage_options,
            )  # fmt: skip
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.exists():
            raise FileNotFoundError(f"{source}: no {WEIGHTS_NAME}")
        try:
            state = load_file(str(weights_path))
        except Exception as err:  # safetensors' own errors name no file
            raise ValueError(f"{source}/{WEIGHTS_NAME} is unreadable: {err}") from err
        # The checkpoint holds every VLM tensor, so `load_vlm_weights` (true in smolvla_base's
        # config.json) fetches nothing here; LeRobot fetches them and then overwrites them.
        policy = policy_class(config, prefix_mode=prefix_mode, fetch_vlm_weights=False)
        check_state_dict_keys(policy.state_dict(), state, source=f"{source}/{WEIGHTS_NAME}")
        policy.load_state_dict(state, strict=True)
        if (directory / PRE_STATE).exists():
            policy.processor = PolicyProcessor.load(config, directory)
        else:
            log.warning("%s has no processor files; policy.processor is None", source)
    return policy


def _load_adapter(
    policy_class: type[SmolVLAPolicy],
    source: str,
    directory: Path,
    config: PolicyConfig,
    *,
    prefix_mode: PrefixMode,
    storage_options: dict,
) -> SmolVLAPolicy:
    """A PEFT adapter directory on top of the base its `adapter_config.json` names, as
    LeRobot's `make_policy` loads it: the adapter directory's config builds the policy, the
    base's `model.safetensors` fills it, then the adapters and the directory's processor."""
    from smolvla_ray.policy.adapters import (
        ADAPTER_WEIGHTS,
        add_adapters,
        load_adapter_tensors,
        read_adapter_config,
        settings_of,
    )

    peft_config = read_adapter_config(directory)
    base = peft_config.base_model_name_or_path
    if not base:
        raise ValueError(
            f"{source}/adapter_config.json names no base policy (base_model_name_or_path); "
            "set it to the pretrained_model/ the adapter was trained on"
        )
    if (Path(base).expanduser() / "adapter_config.json").exists():
        raise ValueError(f"{source}: its base {base} is itself an adapter; merge that one first")
    base_config = config.model_dump()
    base_config["use_peft"] = False
    policy = load_pretrained(
        policy_class, base, prefix_mode=prefix_mode, config_overrides=base_config,
        revision=peft_config.revision, **storage_options,
    )  # fmt: skip
    add_adapters(policy, settings_of(peft_config))
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.exists():
        raise FileNotFoundError(f"{source}: no {ADAPTER_WEIGHTS}")
    load_adapter_tensors(policy, load_file(str(weights_path)), source=f"{source}/{ADAPTER_WEIGHTS}")
    policy.config = config  # use_peft: true, as the directory says
    policy.adapter_base = (base, peft_config.revision)
    if (directory / PRE_STATE).exists():
        policy.processor = PolicyProcessor.load(config, directory)
    return policy


def save_pretrained(policy: SmolVLAPolicy, target: str, **storage_options) -> None:
    """Write `policy` as a LeRobot `pretrained_model/` to a local path or fsspec URL."""
    if _is_url(target) and not target.startswith("file://"):
        with tempfile.TemporaryDirectory(prefix="smolvla-save-") as tmp:
            _write_local(policy, Path(tmp))
            fs, root = filesystem(target, storage_options)
            fs.makedirs(root, exist_ok=True)
            for path in Path(tmp).iterdir():
                fs.put(str(path), f"{root}/{path.name}")
        return
    _write_local(policy, Path(target.removeprefix("file://")))


def _write_local(policy: SmolVLAPolicy, directory: Path) -> None:
    from smolvla_ray.policy.adapters import has_adapters, write_adapter

    if has_adapters(policy):
        # LeRobot's adapter layout, naming the base the adapters sit on.
        base = getattr(policy, "adapter_base", None)
        if base is None:
            raise ValueError(
                "this policy carries LoRA adapters but names no base policy to save them "
                "against; set policy.adapter_base = (base URI, revision), or merge them "
                "(policy/adapters.merge_adapters) to save full weights"
            )
        write_adapter(policy, directory, base=base[0], revision=base[1])
        return
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(policy.config.to_lerobot_json())
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in policy.state_dict().items()
    }
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if policy.processor is not None:
        policy.processor.save(directory)
