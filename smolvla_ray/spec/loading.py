"""Reading job specs: YAML files, `--set key.path=value` overrides, the JSON Schema."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from smolvla_ray.spec.job import (
    JobSpec,
    SpecError,
    env_storage_options,
    schema_child,
    valid_keys_hint,
)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the
    last silently, so a typo'd second `lr:` would win without a word)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None,
                f"key {key!r} appears twice (lines {seen[key] + 1} and "
                f"{key_node.start_mark.line + 1}); keep one",
                key_node.start_mark,
            )  # fmt: skip
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_yaml(text: str) -> Any:
    """YAML as a job spec reads it: safe, duplicate keys refused."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a job spec (what `smolvla-ray schema` prints)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **JobSpec.model_json_schema(),
    }


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (value parsed as YAML) to a copy of `data`.

    A path must exist in the schema; below mapping-typed fields (policy.overrides,
    storage_options, scaling.resources_per_worker) any key may be added."""
    result = copy.deepcopy(dict(data))
    given: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise SpecError(f"--set {item!r}: expected key.path=value, e.g. train.steps=50")
        if ".".join(path) in given:
            raise SpecError(f"--set {key.strip()} is given twice; keep one")
        given.add(".".join(path))
        model: Any = JobSpec
        for depth, part in enumerate(path):
            if model == "dict":
                break
            if model is None:
                parent = ".".join(path[:depth])
                raise SpecError(f"--set {key}: {parent} is a single value and has no {part!r}")
            if part not in model.model_fields:
                hint = valid_keys_hint(path[:depth], part)
                raise SpecError(f"--set {key}: no field {part!r}; {hint}")
            model = schema_child(model.model_fields[part].annotation)
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError as err:
            raise SpecError(f"--set {key}: {raw!r} is not a valid YAML value ({err})") from None
        node = result
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return result


def spec_from_dict(
    data: Mapping[str, Any], overrides: Sequence[str] = (), *, source: str = "job spec"
) -> JobSpec:
    """Validate a spec mapping (after `--set` overrides); raise SpecError listing problems."""
    merged = apply_overrides(data, overrides)
    env_storage_options()  # a malformed environment variable fails now, not on a worker
    try:
        return JobSpec.model_validate(merged)
    except ValidationError as err:
        raise SpecError.from_validation_error(err, source=source) from None


def load_spec(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> JobSpec:
    """Read a YAML job spec from a local file, apply `--set` overrides and validate it."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"job spec {str(file)!r} does not exist; check the path")
    if file.is_dir():
        raise SpecError(f"job spec {str(file)!r} is a directory; give a .yaml file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(
            f"{file} is not UTF-8 text (byte {err.start}); save the job spec as UTF-8"
        ) from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(f"{file}: invalid YAML{at}: {problem}") from None
    if data is None:
        raise SpecError(f"{file} is empty; a job spec needs name, policy, data, train, checkpoint")
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise SpecError(f"{file} must hold a YAML mapping at the top level, not a {kind}")
    return spec_from_dict(data, overrides, source=str(file))
