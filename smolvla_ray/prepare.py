"""What the driver does with a job spec before Ray starts, beside `driver.preflight`: the
spec's hub ids checked and pinned to commits, the feature check `validate` can make from
local files, and the resume checked against the run's newest checkpoint.

Driver side (ranked with `driver`): these take a `JobSpec`, which below the driver only
`settings.py` imports (tests/unit/test_layers.py); the layers below take plain values or
`RunSettings`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smolvla_ray import hub
from smolvla_ray.build import resolve_run_features
from smolvla_ray.features import FeatureResolution, read_pretrained_config
from smolvla_ray.run_layout import run_uri
from smolvla_ray.settings import RunSettings
from smolvla_ray.spec import JobSpec

log = logging.getLogger(__name__)


def check_hub_ids(spec: JobSpec) -> None:
    """Before anything starts: each hub id and revision of `spec` exists (offline: is in
    the cache), and a revision is only given for a hub id. Raises HubIdError (a
    FileNotFoundError), ValueError or ConnectionError, each naming the field and the fix."""
    policy, data = spec.policy, spec.data
    if policy.revision is not None and not hub.is_hub_id(policy.pretrained):
        raise ValueError(
            f"policy.revision={policy.revision!r} needs a hub id in policy.pretrained (got "
            f"{policy.pretrained or 'a preset'!r}); remove the revision"
        )
    if hub.is_hub_id(policy.pretrained):
        hub.resolve_commit(str(policy.pretrained), "model", policy.revision)
    if data.datasets is not None:
        for i, entry in enumerate(data.datasets):
            _check_dataset_id(entry.uri, entry.revision, f"data.datasets[{i}].")
        return
    _check_dataset_id(str(data.uri), data.revision, "data.")


def _check_dataset_id(uri: str, revision: str | None, field: str) -> None:
    if hub.dataset_repo(uri) is None:
        if revision is not None:
            raise ValueError(
                f"{field}revision={revision!r} needs a hub dataset id in {field}uri (like "
                f"lerobot/pusht), got {uri!r}; remove the revision"
            )
        return
    hub.dataset_url(uri, revision)


def pin_hub_revisions(spec: JobSpec) -> JobSpec:
    """`spec` with each hub revision replaced by the commit it names now, so every worker,
    restart and export of the run sees the same files even if the branch moves."""
    updates = {}
    if hub.is_hub_id(spec.policy.pretrained):
        commit = hub.resolve_commit(str(spec.policy.pretrained), "model", spec.policy.revision)
        if commit != spec.policy.revision:
            log.info(
                "policy.pretrained=%s at %s is commit %s",
                spec.policy.pretrained,
                spec.policy.revision or hub.DEFAULT_REVISION,
                commit,
            )
            updates["policy"] = spec.policy.model_copy(update={"revision": commit})
    if spec.data.datasets is not None:
        entries = [_pinned(d) for d in spec.data.datasets]
        if entries != spec.data.datasets:
            updates["data"] = spec.data.model_copy(update={"datasets": entries})
    else:
        data = _pinned(spec.data)
        if data is not spec.data:
            updates["data"] = data
    return spec.model_copy(update=updates) if updates else spec


def _pinned(entry: Any) -> Any:
    """`entry` (the data section, or a mixture's dataset) with a hub dataset id's revision
    pinned to its commit; itself when nothing changes."""
    repo = hub.dataset_repo(entry.uri) if entry.uri is not None else None
    if repo is not None and repo[1] is None:  # a revision inside an hf:// URL stays there
        commit = hub.resolve_commit(repo[0], "dataset", entry.revision)
        if commit != entry.revision:
            return entry.model_copy(update={"revision": commit})
    return entry


def resolve_local(spec: JobSpec) -> tuple[FeatureResolution | None, str]:
    """The spec's feature resolution when both JSON files are on this machine (what
    `validate` can check instantly: no network, no torch), else (None, why it was skipped)."""
    uris = (
        {d.resolved_name: d.uri for d in spec.data.datasets}
        if spec.data.datasets is not None
        else {"": str(spec.data.uri)}
    )
    infos = {}
    for name, full in uris.items():
        uri = full.removeprefix("file://")
        info = Path(uri).expanduser() / "meta" / "info.json"
        if "://" in uri or not info.is_file():
            return None, f"the dataset's meta/info.json is not a local file ({full})"
        infos[name] = info
    text = None
    pretrained = spec.policy.pretrained
    if pretrained is not None:
        local = Path(pretrained.removeprefix("file://")).expanduser()
        if "://" in pretrained.removeprefix("file://") or not local.is_dir():
            return None, f"policy.pretrained is not a local directory ({pretrained})"
        text = read_pretrained_config(str(local), {})
    features = {}
    for name, info in infos.items():
        try:
            features[name] = json.loads(info.read_text())["features"]
        except (ValueError, KeyError) as err:
            raise ValueError(f"{info} is not a LeRobot info.json: {err}") from err
    settings = RunSettings.from_spec(spec)
    first = next(iter(features.values()))
    mixture = features if spec.data.datasets is not None else None
    return resolve_run_features(settings, text, first, mixture_features=mixture)[1], ""


def check_resume_spec(spec: JobSpec, storage_options: Mapping[str, Any]) -> list[str]:
    """Before Ray starts: compare `spec` (local paths resolved) with the spec recorded in
    the run's newest checkpoint whose files have their manifest's sizes (hashes are the
    trainer's), by `checkpoint/resume.py`'s table. Raises ResumeRefused; returns the
    announcements (nothing to resume: [])."""
    # Imported here: the checkpoint format imports torch, which `validate` never needs.
    from smolvla_ray.checkpoint.discovery import list_checkpoints
    from smolvla_ray.checkpoint.resume import check_resume_changes, recorded_spec

    run = run_uri(spec.checkpoint.storage, spec.name)
    for info in reversed(list_checkpoints(run, storage_options, hashes=False)):
        if not info.valid:
            continue
        try:
            recorded = recorded_spec(info.uri, storage_options)
        except (ValueError, KeyError, TypeError):  # altered in place: the trainer skips it
            continue
        pinned = pin_hub_revisions(spec)  # the run records hub revisions as the commits
        return check_resume_changes(recorded, pinned.public_dict(), checkpoint_uri=info.uri)
    return []
