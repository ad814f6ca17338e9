"""Driver-side live progress: step / total, loss, samples/s and ETA.

Sources: a run's `metrics.jsonl` polled by `watch_metrics` (what `run` uses: it works on every
storage and needs no log parsing), or the rank-0 lines `[smolvla-ray] step 10/60 ...` that
`parse_progress_line` reads (what `logs --follow` uses). Both feed `Progress.update`.
Modes: `bar` (a tqdm bar), `lines` (plain text), `json` (one object per update), `quiet`.
No torch or ray here: the CLI imports it.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Collection, Mapping
from typing import Any, Literal, TextIO, get_args

from smolvla_ray.run_layout import METRICS_FILE, metrics_lines
from smolvla_ray.storage import filesystem, join

ProgressMode = Literal["bar", "lines", "json", "quiet"]
PROGRESS_MODES: tuple[str, ...] = get_args(ProgressMode)


def default_mode(stream: TextIO | None = None) -> ProgressMode:
    """`bar` on a terminal, `lines` otherwise (a log file or a pipe)."""
    stream = stream or sys.stdout
    return "bar" if stream.isatty() else "lines"


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A progress display fed with metric records (`step`, `loss`, `samples_per_s`, and
    optionally `lr`, `eta_s`, `step_s`, `total_steps`)."""

    def __init__(
        self,
        mode: ProgressMode | None = None,
        total_steps: int | None = None,
        *,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stdout
        self.mode: ProgressMode = mode or default_mode(self.stream)
        if self.mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {', '.join(PROGRESS_MODES)}")
        self.total_steps = total_steps
        self.last: dict[str, Any] | None = None
        self._bar: Any = None
        self._lock = threading.Lock()  # updates may come from a watcher thread

    def snapshot(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """What one update shows: step, total, loss, lr, samples/s and ETA in seconds."""
        total = record.get("total_steps", self.total_steps)
        step = int(record["step"])
        eta = record.get("eta_s")
        if eta is None and record.get("step_s") is not None and total is not None:
            eta = float(record["step_s"]) * max(total - step, 0)
        return {
            "event": "progress",
            "step": step,
            "total_steps": total,
            "loss": record.get("loss"),
            "lr": record.get("lr"),
            "samples_per_s": record.get("samples_per_s"),
            "eta_s": None if eta is None else round(float(eta), 1),
        }

    def update(self, record: Mapping[str, Any]) -> None:
        """Show one record."""
        with self._lock:
            shown = self.snapshot(record)
            if shown["total_steps"] is not None:
                self.total_steps = shown["total_steps"]
            self.last = shown
            if self.mode == "json":
                self.stream.write(json.dumps(shown) + "\n")
                self.stream.flush()
            elif self.mode == "lines":
                self.stream.write(self._text(shown) + "\n")
                self.stream.flush()
            elif self.mode == "bar":
                self._update_bar(shown)

    @staticmethod
    def _stats(shown: Mapping[str, Any]) -> str:
        parts = []
        if shown["loss"] is not None:
            parts.append(f"loss {shown['loss']:.4f}")
        if shown["lr"] is not None:
            parts.append(f"lr {shown['lr']:.2e}")
        if shown["samples_per_s"] is not None:
            parts.append(f"{shown['samples_per_s']:.1f} samples/s")
        parts.append(f"eta {_clock(shown['eta_s'])}")
        return "  ".join(parts)

    def _text(self, shown: Mapping[str, Any]) -> str:
        total = shown["total_steps"]
        where = f"step {shown['step']}/{total}" if total else f"step {shown['step']}"
        if total:
            where += f" ({100 * shown['step'] / total:.0f}%)"
        return f"{where}  {self._stats(shown)}"

    def _update_bar(self, shown: Mapping[str, Any]) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=shown["total_steps"],
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}] {postfix}",
            )
        self._bar.n = shown["step"]  # absolute: a restart may move it back
        self._bar.set_postfix_str(self._stats(shown), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        """End the display (the bar is left on screen at its last state)."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


def _read_lines(fs: Any, path: str) -> list[str]:
    try:
        text = fs.cat_file(path).decode(errors="replace")
    except FileNotFoundError:
        return []
    try:
        return metrics_lines(text, path)
    except ValueError:  # a corrupt line: the display skips what it cannot read
        return [ln for ln in text.splitlines() if _is_record(ln)]


def _is_record(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def existing_records(run_uri: str, storage_options: Mapping[str, Any] | None) -> set[str]:
    """The lines of `<run_uri>/metrics.jsonl` now (an earlier run of the same job)."""
    fs, root = filesystem(run_uri, storage_options or {})
    try:
        return set(_read_lines(fs, join(root, METRICS_FILE)))
    except OSError:
        return set()


def watch_metrics(
    run_uri: str,
    storage_options: Mapping[str, Any] | None,
    progress: Progress,
    stop_event: threading.Event,
    *,
    interval_s: float = 1.0,
    skip: Collection[str] | None = None,
) -> None:
    """Feed `progress` with the new records of `<run_uri>/metrics.jsonl` until `stop_event`
    is set, then read once more. Lines in `skip` (default: those present when it starts,
    i.e. an earlier run of the same job) are not shown. Meant for a background thread while
    `fit()` blocks."""
    fs, root = filesystem(run_uri, storage_options or {})
    path = join(root, METRICS_FILE)
    seen = set(existing_records(run_uri, storage_options) if skip is None else skip)
    while True:
        stopping = stop_event.wait(interval_s)
        try:
            lines = _read_lines(fs, path)
        except OSError:  # storage hiccup: the next poll tries again; training is unaffected
            lines = []
        for line in lines:
            if line not in seen:
                seen.add(line)
                progress.update(json.loads(line))
        if stopping:
            return


class MetricsWatcher:
    """`watch_metrics` on a daemon thread: create it before the run starts (it notes the
    records already there), `start()`, then `stop()` once `fit()` returned (it shows the
    last records and closes the display). Also a context manager."""

    def __init__(
        self,
        run_uri: str,
        storage_options: Mapping[str, Any] | None,
        progress: Progress,
        *,
        interval_s: float = 1.0,
    ) -> None:
        self.progress = progress
        self._stop = threading.Event()
        skip = existing_records(run_uri, storage_options)  # before the run writes anything
        self._thread = threading.Thread(
            target=watch_metrics,
            args=(run_uri, storage_options, progress, self._stop),
            kwargs={"interval_s": interval_s, "skip": skip},
            name="smolvla-progress",
            daemon=True,
        )

    def start(self) -> MetricsWatcher:
        self._thread.start()
        return self

    def stop(self, *, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        self.progress.close()

    def __enter__(self) -> MetricsWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
