"""Frame lookup by timestamp in mp4 files with PyAV (AV1, H.264, HEVC).

A `VideoFile` keeps its container and decoder open between calls and remembers where the
decoder is: a request just after the last decoded frame continues decoding (sequential
access, one frame decoded per frame returned), anything else seeks to the nearest keyframe
at or before the timestamp and decodes forward (random access, as LeRobot does). With
LeRobot's keyframe interval of 2 a random access decodes at most 2 frames, which is why it
is the loader's default (numbers in benchmarks/data_throughput.py).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smolvla_ray.data.layout import DEFAULT_TOLERANCE_S

# Decode forward instead of seeking when the target is at most this far past the decoder.
_MAX_FORWARD_GAP_S = 0.5
_RECENT_FRAMES = 8
_SEEK_MARGINS_S = (0.0, 0.25, 1.0, 4.0, float("inf"))


class FrameTimestampError(LookupError):
    """No frame of a video lies within the tolerance of a requested timestamp."""


class VideoDecodeError(ValueError):
    """A video file cannot be opened or decoded (truncated, corrupt, not a video)."""


class VideoFile:
    """An open video, returning uint8 [H, W, 3] RGB frames at requested timestamps.

    Not thread-safe by itself; `VideoPool` gives each process its own set of open files.
    """

    def __init__(self, path: str | Path, *, name: str | None = None, thread_count: int = 1):
        import av

        self.path = str(path)
        self.name = name or self.path
        try:
            self._container = av.open(self.path)
            self._stream = self._container.streams.video[0]
        except (av.error.FFmpegError, IndexError, OSError) as err:
            if isinstance(err, FileNotFoundError):
                raise FileNotFoundError(f"video {self.name} does not exist") from err
            raise VideoDecodeError(
                f"video {self.name} cannot be opened ({err}); the file is truncated, corrupt "
                "or not an mp4 — re-download or re-encode it"
            ) from err
        # One thread per decoder: loader processes already use every core, and frames are small.
        self._stream.codec_context.thread_count = thread_count
        self._time_base = float(self._stream.time_base)
        self._decoder: Iterator | None = None
        self._last_time = -np.inf
        # Recently decoded frames, converted to RGB only when asked for: most decoded frames
        # are the skipped ones between a keyframe and the target.
        self._recent: collections.OrderedDict[float, Any] = collections.OrderedDict()
        self.num_seeks = 0
        self.num_decoded = 0

    def close(self) -> None:
        """Release the container."""
        self._decoder = None
        self._container.close()

    def frames_at(
        self,
        timestamps: Sequence[float],
        *,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        context: str = "",
    ) -> np.ndarray:
        """Frames [N, H, W, 3] uint8 at `timestamps` (seconds in the file), each within tolerance.

        `context` (e.g. "episode 3, camera observation.images.top") goes into errors.
        """
        out = [self._frame_at(float(t), tolerance_s, context) for t in timestamps]
        return np.stack(out) if out else np.zeros((0, 0, 0, 3), np.uint8)

    def decode_segment(self, start_s: float, end_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Every frame with start_s <= time < end_s, decoded in one pass: (times, frames)."""
        self._seek(start_s)
        times, frames = [], []
        for time, frame in self._decode():
            if time >= end_s - 1e-9:
                break
            if time >= start_s - 1e-9:
                times.append(time)
                frames.append(_rgb(frame))
        return np.array(times), np.stack(frames)

    def _frame_at(self, t: float, tolerance_s: float, context: str) -> np.ndarray:
        for time, frame in self._recent.items():
            if abs(time - t) <= tolerance_s:
                return _rgb(frame)
        ahead = self._last_time < t <= self._last_time + _MAX_FORWARD_GAP_S
        seek = self._decoder is None or not ahead
        for margin in _SEEK_MARGINS_S:
            if seek:
                self._seek(max(0.0, t + tolerance_s - margin))
            first = True
            for time, frame in self._decode():
                if abs(time - t) <= tolerance_s:
                    return _rgb(frame)
                if time > t + tolerance_s:
                    break
                first = False
            # With B-frames (HEVC, H.264) a seek can land on a keyframe whose leading frames
            # come out after t: when the very first frame is already late, seek further back.
            if not (seek and first) or margin == _SEEK_MARGINS_S[-1]:
                break
        raise FrameTimestampError(
            f"no frame at t={t:.6f}s (tolerance {tolerance_s}s) in video {self.name}"
            + (f" ({context})" if context else "")
            + f"; nearest decoded frames: {[round(x, 6) for x in self._recent]}"
        )

    def _seek(self, t: float) -> None:
        import av

        # Callers pass the latest acceptable time, so the keyframe found (at or before it)
        # never lies after the wanted frame.
        target = max(0, int(t / self._time_base))
        try:
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        except av.error.FFmpegError as err:
            raise VideoDecodeError(f"video {self.name}: seek to {t:.6f}s failed ({err})") from err
        self._decoder = None
        self._last_time = -np.inf
        self.num_seeks += 1

    def _decode(self) -> Iterator[tuple[float, Any]]:
        """Continue decoding from the current position, remembering recent frames."""
        import av

        if self._decoder is None:
            self._decoder = self._container.decode(self._stream)
        while True:
            try:
                frame = next(self._decoder)
            except StopIteration:
                self._decoder = None
                return
            except av.error.FFmpegError as err:
                self._decoder = None
                raise VideoDecodeError(
                    f"video {self.name} cannot be decoded ({err}); the file is truncated or "
                    "corrupt — re-download or re-encode it"
                ) from err
            if frame.pts is None:
                continue
            time = frame.pts * self._time_base
            self.num_decoded += 1
            self._last_time = time
            self._recent[time] = frame
            while len(self._recent) > _RECENT_FRAMES:
                self._recent.popitem(last=False)
            yield time, frame


def _rgb(frame: Any) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


class VideoPool:
    """Per-process LRU of open `VideoFile`s, so consecutive samples reuse decoders.

    A v3.0 video file holds many episodes, so a few open files serve a whole epoch. The pool
    is created lazily in each process and never pickled (see `FrameDataset.__getstate__`).
    """

    def __init__(self, max_open: int = 32) -> None:
        self.max_open = max_open
        self._files: collections.OrderedDict[str, VideoFile] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | Path, *, name: str | None = None) -> VideoFile:
        """The open file for `path`, opening it (and closing the least recently used) if needed."""
        key = str(path)
        with self._lock:
            video = self._files.pop(key, None)
            if video is None:
                video = VideoFile(key, name=name)
            self._files[key] = video
            while len(self._files) > self.max_open:
                _, old = self._files.popitem(last=False)
                old.close()
            return video

    def close(self) -> None:
        """Close every open file."""
        with self._lock:
            for video in self._files.values():
                video.close()
            self._files.clear()
