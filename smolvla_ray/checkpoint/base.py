"""The identity of the base weights a run trains on top of, as recorded in every checkpoint
(`state.json`'s `base`), and the check that a resumed checkpoint was trained on this base.

`uri` is the pretrained directory, URL or hub id (or `preset:<name>`); `revision` and
`commit` are the hub revision asked for and the commit it named (None off the Hub);
`frozen_sha256` is the fingerprint of the frozen tensors. Trained tensors merged onto another
backbone are silently wrong, so a resume or `from_checkpoint` onto a base with another commit
or fingerprint is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smolvla_ray import hub
from smolvla_ray.settings import PolicySettings


def base_revision(policy: PolicySettings) -> dict[str, str | None]:
    """The hub revision of the base and the commit it names (both None off the Hub)."""
    return {
        "revision": policy.revision,
        "commit": hub.model_commit(policy.pretrained, policy.revision),
    }


def base_identity(policy: PolicySettings, frozen_sha256: str) -> dict[str, Any]:
    """What a checkpoint's `base` must match to be resumed by the run of `policy`."""
    return {
        "uri": policy.pretrained or f"preset:{policy.preset}",
        "frozen_sha256": frozen_sha256,
        **base_revision(policy),
    }


def _show(base: Mapping[str, Any]) -> str:
    at = f"@{base['commit']}" if base.get("commit") else ""
    return f"{base.get('uri')}{at}"


def check_resume_base(
    recorded: Mapping[str, Any], current: Mapping[str, Any], *, checkpoint_uri: str
) -> None:
    """Raise ValueError naming both values when the checkpoint's base commit or frozen
    fingerprint differs from this run's. A checkpoint without a recorded commit (a local or
    preset base, or written before commits were recorded) is checked by fingerprint."""
    old_commit, new_commit = recorded.get("commit"), current.get("commit")
    if old_commit and new_commit and old_commit != new_commit:
        pin = recorded.get("uri")
        raise ValueError(
            f"checkpoint {checkpoint_uri} was trained on base {_show(recorded)} (commit "
            f"{old_commit}) but this run's base is {_show(current)} (commit {new_commit}). "
            f"Set policy.pretrained: {pin} and policy.revision: {old_commit} to continue it, "
            "or start a new run (another name or checkpoint.storage) for the new base"
        )
    old_sha, new_sha = recorded.get("frozen_sha256"), current.get("frozen_sha256")
    if old_sha and new_sha and old_sha != new_sha:
        raise ValueError(
            f"checkpoint {checkpoint_uri} was trained on base {_show(recorded)} with frozen "
            f"fingerprint {old_sha} but this run's base {_show(current)} has {new_sha}: the "
            "frozen weights differ (another checkpoint, preset seed or freezing overrides). "
            "Use the same base, or start a new run (another name or checkpoint.storage)"
        )
