"""The data path: LeRobot datasets (v3.0, v2.1) at any fsspec URL -> training batches.

Layout along the data flow: `storage` (URLs, node-local video cache) -> `meta` (info, stats,
tasks, episodes) -> `frames` (state/action/index table) -> `video` (PyAV decoding) ->
`samples` (LeRobot-exact samples, collate) -> `loader` (sharded, resumable batches).
`synthetic` and `writer` produce datasets for the demo, tests and benchmarks.

Imports here stay light (no torch, no av) so `import smolvla_ray.data` is cheap; import the
submodules for the heavy parts.
"""

from smolvla_ray.data.layout import DEFAULT_TOLERANCE_S, SUPPORTED_VERSIONS
from smolvla_ray.data.meta import DatasetMeta, EpisodeMeta, check_cameras, load_meta
from smolvla_ray.data.storage import FileCache, Storage, StorageUnavailableError

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "SUPPORTED_VERSIONS",
    "DatasetMeta",
    "EpisodeMeta",
    "FileCache",
    "Storage",
    "StorageUnavailableError",
    "check_cameras",
    "load_meta",
]
