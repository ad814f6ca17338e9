"""A pretrained policy's weights file checked from its header alone, without torch: the
driver's pre-flight refuses a `model.safetensors` cut short by an interrupted copy before
any Ray worker tries to load it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from smolvla_ray.storage import filesystem

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter directory's (policy/adapters.py)


def safetensors_problem(read_head: Callable[[int, int], bytes], size: int) -> str | None:
    """Why a safetensors file of `size` bytes is unreadable, or None, from its header alone
    (`read_head(start, end)` reads a byte range): a file cut short by an interrupted copy
    has a header that promises more bytes than it holds."""
    if size < 8:
        return f"it has {size} bytes, fewer than a safetensors header"
    header_len = int.from_bytes(read_head(0, 8), "little")
    if header_len <= 0 or 8 + header_len > size:
        return "its header is cut short or not safetensors"
    try:
        header = json.loads(read_head(8, 8 + header_len))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (ValueError, KeyError, TypeError, IndexError):
        return "its header is not valid safetensors JSON"
    if 8 + header_len + end != size:
        return f"it has {size:,} bytes but its header describes {8 + header_len + end:,}"
    return None


def weights_problem(source: str, storage_options: Mapping[str, Any]) -> str | None:
    """Why a local or fsspec `pretrained_model/`'s weights cannot load, or None; checked
    before a run starts (hub ids are checked when their snapshot is fetched)."""
    if "://" in source:
        fs, root = filesystem(source, storage_options)
        path = f"{root.rstrip('/')}/{WEIGHTS_NAME}"
    else:
        fs, path = None, str(Path(source).expanduser() / WEIGHTS_NAME)
        if not Path(source).expanduser().is_dir():
            return None  # a hub id, or missing: the config check names it
    where = f"{source.rstrip('/')}/{WEIGHTS_NAME}"
    try:
        if fs is None:
            size = os.path.getsize(path)
            with open(path, "rb") as f:

                def read_head(start: int, end: int) -> bytes:
                    f.seek(start)
                    return f.read(end - start)

                problem = safetensors_problem(read_head, size)
        else:
            size = int(fs.size(path))
            problem = safetensors_problem(lambda a, b: fs.cat_file(path, start=a, end=b), size)
    except FileNotFoundError:
        return f"{where} does not exist"
    return f"{where} is unreadable: {problem}" if problem else None


def check_state_dict_keys(
    expected: Mapping[str, Any], found: Mapping[str, Any], *, source: str
) -> None:
    """Raise naming every missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = sorted(
        f"{k}: {tuple(found[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in set(expected) & set(found)
        if found[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:20])}")
    if wrong_shape:
        problems.append(f"wrong shapes: {', '.join(wrong_shape[:20])}")
    if problems:
        raise ValueError(
            f"{source} does not match the policy its config.json describes; " + "; ".join(problems)
        )
