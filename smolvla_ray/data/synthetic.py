"""A small synthetic LeRobot dataset whose content can be learned.

Each episode pushes a coloured cube toward a goal that depends on the task string; the
cube's position in every camera image follows `observation.state`, and the action is the
next state. A policy therefore has to read the images (or the state) and the task to predict
the actions, and a short finetune visibly lowers the loss. Everything is a pure function of
`(seed, episode_index)`, so tests can regenerate exactly what was written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from smolvla_ray.data.layout import CodebaseVersion
from smolvla_ray.data.writer import Codec, EpisodeData, write_dataset
from smolvla_ray.keys import camera_key, camera_name_problem

TASKS: tuple[str, ...] = (
    "push the red cube to the left",
    "push the green cube to the right",
    "lift the blue cube up",
)
_TASK_COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 80, 230]], dtype=np.float32)
_TASK_GOALS = (("x", 0.12), ("x", 0.88), ("y", 0.12))
STATE_NAMES: tuple[str, ...] = ("x", "y", "vx", "vy", "gripper", "progress")
STATE_DIM = len(STATE_NAMES)
TIMECODE_BITS = 8
TIMECODE_ROWS = 6


@dataclass(frozen=True)
class DemoEpisode:
    """What the writer stores for one episode (the ground truth tests compare against)."""

    episode_index: int
    task: str
    state: np.ndarray  # float32 [L, 6]
    action: np.ndarray  # float32 [L, 6]: action[t] = state[t + 1], the last repeats
    frames: dict[str, np.ndarray]  # camera key -> uint8 [L, H, W, 3]


def episode_lengths(num_episodes: int, episode_length: int) -> list[int]:
    """Lengths vary a little (L, L-7, L-14, ...) so episode boundaries fall everywhere."""
    return [max(2, episode_length - 7 * (i % 3)) for i in range(num_episodes)]


def make_demo_episode(
    episode_index: int,
    *,
    length: int,
    cameras: Sequence[str] = ("top", "wrist"),
    height: int = 96,
    width: int = 128,
    seed: int = 0,
    state_dim: int = STATE_DIM,
    action_dim: int | None = None,
) -> DemoEpisode:
    """Generate one episode: a smooth push from a random start to the task's goal.

    The state is (x, y, vx, vy, gripper, progress) then, beyond 6 dims, sin/cos harmonics
    of the progress (another robot's width); the action is the next state's first
    `action_dim` (default `state_dim`) values, zero-extended if wider."""
    rng = np.random.default_rng([seed, episode_index])
    task_id = episode_index % len(TASKS)
    start = rng.uniform(0.3, 0.7, size=2)
    goal = start.copy()
    axis, value = _TASK_GOALS[task_id]
    goal[0 if axis == "x" else 1] = value
    phase = np.linspace(0.0, 1.0, length)
    ease = phase * phase * (3.0 - 2.0 * phase)  # smoothstep: starts and stops gently
    xy = start[None, :] + (goal - start)[None, :] * ease[:, None]
    xy += rng.normal(0.0, 0.004, size=xy.shape)
    velocity = np.vstack([np.diff(xy, axis=0), np.zeros((1, 2))]) * 10.0
    gripper = (phase > 0.1).astype(np.float64)
    extra = [np.sin(np.pi * (k + 1) * phase) for k in range(max(0, state_dim - STATE_DIM))]
    state = np.column_stack([xy, velocity, gripper, phase, *extra])[:, :state_dim]
    state = state.astype(np.float32)
    width_a = state_dim if action_dim is None else action_dim
    action = np.zeros((length, width_a), dtype=np.float32)
    following = np.vstack([state[1:], state[-1:]])
    action[:, : min(width_a, state_dim)] = following[:, : min(width_a, state_dim)]
    frames = {
        camera_key(cam): _render(xy, task_id, view=k, height=height, width=width)
        for k, cam in enumerate(cameras)
    }
    return DemoEpisode(episode_index, TASKS[task_id], state, action, frames)


def _render(xy: np.ndarray, task_id: int, *, view: int, height: int, width: int) -> np.ndarray:
    """Frames of one camera: a soft-edged cube at the state's position on a gradient.

    View 0 looks from the top; other views zoom in around the centre (a wrist-like camera),
    so the cameras disagree in position and scale but both follow the state.
    """
    zoom = 1.0 + 0.5 * view
    cx = ((xy[:, 0] - 0.5) * zoom + 0.5) * (width - 1)
    cy = ((xy[:, 1] - 0.5) * zoom + 0.5) * (height - 1)
    half = 0.09 * zoom * min(height, width)
    ys = np.arange(height, dtype=np.float32)[None, :, None]
    xs = np.arange(width, dtype=np.float32)[None, None, :]
    # Distance outside the square (0 inside), smoothed over 2 px to keep the codec happy.
    dx = np.abs(xs - cx[:, None, None].astype(np.float32)) - half
    dy = np.abs(ys - cy[:, None, None].astype(np.float32)) - half
    alpha = np.clip(1.0 - np.maximum(dx, dy) / 2.0, 0.0, 1.0)[..., None]
    gradient = np.linspace(40.0, 110.0, width, dtype=np.float32)[None, None, :, None]
    tint = np.array([1.0, 0.9 + 0.1 * view, 0.8 + 0.2 * view], dtype=np.float32)
    background = np.broadcast_to(gradient * tint, (1, height, width, 3))
    image = background * (1.0 - alpha) + _TASK_COLOURS[task_id] * alpha
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    image[:, height - TIMECODE_ROWS :] = _timecode(len(xy), width)
    return image


def _timecode(length: int, width: int) -> np.ndarray:
    """A strip of `TIMECODE_BITS` black/white cells spelling the frame index in binary.

    Like a slate's timecode: it makes every frame unique even where the cube barely moves,
    so tests can tell frame t from frame t +- 1 regardless of codec error.
    """
    bits = (np.arange(length)[:, None] >> np.arange(TIMECODE_BITS)[None, :]) & 1
    cells = np.where(bits, 235, 20).astype(np.uint8)  # [L, bits]
    columns = np.minimum(np.arange(width) * TIMECODE_BITS // width, TIMECODE_BITS - 1)
    strip = cells[:, columns]  # [L, W]
    return np.repeat(strip[:, None, :, None], TIMECODE_ROWS, axis=1).repeat(3, axis=3)


def read_timecode(image: np.ndarray) -> int:
    """The frame index written into a frame's timecode strip (uint8 [H, W, 3])."""
    height, width = image.shape[:2]
    strip = image[height - TIMECODE_ROWS :].astype(np.float64).mean(axis=(0, 2))
    cell = width // TIMECODE_BITS
    bits = [strip[i * cell + 2 : (i + 1) * cell - 2].mean() > 127 for i in range(TIMECODE_BITS)]
    return sum(int(b) << i for i, b in enumerate(bits))


def write_demo_dataset(
    out: str,
    *,
    format: CodebaseVersion = "v3.0",
    num_episodes: int = 8,
    cameras: Sequence[str] = ("top", "wrist"),
    codec: Codec = "av1",
    fps: int = 30,
    episode_length: int = 50,
    height: int = 96,
    width: int = 128,
    seed: int = 0,
    state_dim: int = STATE_DIM,
    action_dim: int | None = None,
    storage_options: dict | None = None,
) -> str:
    """Write a learnable synthetic LeRobot dataset with real mp4 videos and computed stats.

    `out` is a local directory or any fsspec URL (then `storage_options` reach the
    filesystem). Returns `out`. `codec` is `av1` (libsvtav1, LeRobot's default) or `h264`;
    `hevc` is accepted too so the reader's HEVC path can be tested.
    """
    if format not in ("v3.0", "v2.1"):
        raise ValueError(f"format={format!r} is not supported; use 'v3.0' or 'v2.1'")
    if num_episodes < 1:
        raise ValueError(f"num_episodes={num_episodes} must be at least 1")
    if not cameras:
        raise ValueError("cameras is empty; name at least one camera, e.g. ('top', 'wrist')")
    for name in cameras:
        if problem := camera_name_problem(name):
            raise ValueError(problem)
    if fps < 1:
        raise ValueError(f"fps={fps} must be a positive integer")
    if height % 2 or width % 2:
        raise ValueError(f"height={height} and width={width} must be even for yuv420p video")
    lengths = episode_lengths(num_episodes, episode_length)
    episodes = (
        _to_episode_data(
            make_demo_episode(
                i,
                length=lengths[i],
                cameras=cameras,
                height=height,
                width=width,
                seed=seed,
                state_dim=state_dim,
                action_dim=action_dim,
            )
        )
        for i in range(num_episodes)
    )
    write_dataset(
        out,
        episodes,
        format=format,
        fps=fps,
        codec=codec,
        state_names=[*STATE_NAMES, *(f"harmonic_{k}" for k in range(state_dim - STATE_DIM))][
            :state_dim
        ],
        robot_type="synthetic_pusher",
        storage_options=storage_options,
    )
    return out


def _to_episode_data(ep: DemoEpisode) -> EpisodeData:
    return EpisodeData(task=ep.task, state=ep.state, action=ep.action, frames=ep.frames)
