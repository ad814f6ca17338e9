"""LeRobot's feature keys: one set for the policy, the datasets and the feature resolution.

The same strings name a dataset's columns (`info.json` features), the policy's inputs and
outputs (`config.json`), and the entries of a batch; LeRobot 0.6.1 uses exactly these.
"""

from __future__ import annotations

OBS_STATE = "observation.state"
OBS_IMAGES = "observation.images"
IMAGE_PREFIX = f"{OBS_IMAGES}."
ACTION = "action"
OBS_LANGUAGE_TOKENS = "observation.language.tokens"
OBS_LANGUAGE_ATTENTION_MASK = "observation.language.attention_mask"
# Batch-key suffix of a camera's cached vision features (ours: the feature cache).
FEATURES_SUFFIX = ".features"
# Mixtures of datasets (data/mixture.py): which dataset a sample came from, its real action
# dims (B, action_dim) and, per camera, whether the sample has it (`<camera key>` + this).
DATASET_INDEX = "dataset_index"
ACTION_DIM_MASK = "action_dim_mask"
PADDING_MASK_SUFFIX = "_padding_mask"


def camera_key(camera: str) -> str:
    """Feature key of a camera name: `top` -> `observation.images.top` (keys pass through)."""
    return camera if camera.startswith(IMAGE_PREFIX) else IMAGE_PREFIX + camera


def camera_name_problem(name: str) -> str | None:
    """Why `name` cannot be a camera name, or None. A camera name becomes a path component
    (`videos/observation.images.<name>/...`), so it is a plain word: letters, digits, `_`,
    `-` and single dots, nothing that climbs out of its directory."""
    if not name or not name.strip():
        return "a camera name must not be empty"
    bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "_-."))})
    if bad:
        return f"camera {name!r} has {''.join(bad)!r}; use letters, digits, '_', '-' and '.'"
    if name.startswith(".") or name.endswith(".") or ".." in name:
        return f"camera {name!r} must not start or end with '.' or hold '..'"
    return None
