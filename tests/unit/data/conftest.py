"""Small synthetic datasets (v3.0 and v2.1 of the same content) written once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from smolvla_ray.data.synthetic import DemoEpisode, episode_lengths, make_demo_episode


@dataclass(frozen=True)
class Demo:
    """A dataset written by the synthetic writer, with what regenerates its ground truth."""

    root: str
    num_episodes: int
    episode_length: int
    cameras: tuple[str, ...] = ("top", "wrist")
    fps: int = 30
    seed: int = 0

    @property
    def lengths(self) -> list[int]:
        return episode_lengths(self.num_episodes, self.episode_length)

    def episode(self, index: int) -> DemoEpisode:
        return make_demo_episode(
            index, length=self.lengths[index], cameras=self.cameras, seed=self.seed
        )


def write_demo(root: Path, **kwargs) -> Demo:
    from smolvla_ray.data.synthetic import write_demo_dataset

    settings = {"num_episodes": 5, "episode_length": 24} | kwargs
    write_demo_dataset(
        str(root),
        num_episodes=settings["num_episodes"],
        episode_length=settings["episode_length"],
        **{k: v for k, v in settings.items() if k not in ("num_episodes", "episode_length")},
    )
    return Demo(str(root), settings["num_episodes"], settings["episode_length"])


@pytest.fixture(scope="session")
def demo_v30(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return write_demo(tmp_path_factory.mktemp("demo") / "v30", format="v3.0")


@pytest.fixture(scope="session")
def demo_v21(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return write_demo(tmp_path_factory.mktemp("demo") / "v21", format="v2.1")
