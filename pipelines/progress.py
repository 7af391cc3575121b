"""What the generation job shows while it runs: samples done of expected, inputs, pairs/s.

The driver feeds it the rows it receives from the pipeline (one ``input`` row per HR image, one
``sample`` row per (tile, reference) pair). The expected number of samples starts as the plan's
upper bound (inputs x tiles per image x references per tile) and becomes exact as each input
reports how many samples it yields. On a terminal it draws a tqdm bar; otherwise (``ray job logs``,
a pipe, CI) it prints a plain ``progress:`` line whenever samples complete, at most one every
``interval_s`` seconds, and always a last one. A count held back by that limit is shown once the
interval has passed even when no further sample comes, and while no sample completes for
``stall_s`` seconds (storage retrying through an outage, a stuck worker) a ``waiting:`` line says
so, once per ``stall_s``, with where the workers' own warnings are (``stall_hint``). The time
left is the samples still expected at the rate of the last minute (``ETA_WINDOW_S``), counted from
the first sample done, so the start-up (Ray, the references, the first decodes) does not stretch it.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from typing import IO

ETA_WINDOW_S = 60.0
ETA_POINT_S = 1.0  # counts closer than this in time are one point of the rate


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class JobProgress:
    """Counts samples and inputs as they complete and shows them (see the module docstring)."""

    def __init__(
        self,
        inputs: int,
        max_samples_per_input: int,
        *,
        stream: IO[str] | None = None,
        enabled: bool = True,
        interval_s: float = 5.0,
        tty: bool | None = None,
        clock=time.perf_counter,
        stall_s: float = 120.0,
        stall_hint: str | None = None,
    ) -> None:
        self.inputs = int(inputs)
        self.per_input = int(max_samples_per_input)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interval_s = float(interval_s)
        self.clock = clock
        self.t0 = clock()
        self.inputs_done = 0
        self.inputs_failed = 0
        self.samples_reported = 0  # samples announced by the inputs that reported
        self.samples_ok = 0
        self.samples_failed = 0
        self.shards = 0
        self._last_line = -1.0
        self._last_count = -1
        self.stall_s = float(stall_s)
        self.stall_hint = stall_hint
        self._last_change = self.t0  # when the count of done samples last moved
        # (first time, last time, done) of each burst of counts over the last ETA_WINDOW_S: the time
        # left is read from the recent rate, not from the average since the start (the start-up,
        # with nothing done yet, made early estimates several times too long)
        self._recent: collections.deque[tuple[float, float, int]] = collections.deque()
        self._last_stall = -float("inf")  # when the last waiting: line was shown
        self._lock = threading.RLock()  # events (the driver's loop) and the watchdog both print
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        if enabled and tty:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=self.expected, unit="sample", desc="generate", file=self.stream)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self.bar = None
        if enabled and self.interval_s > 0:
            self._watchdog = threading.Thread(target=self._watch, name="job-progress", daemon=True)
            self._watchdog.start()

    # ------------------------------------------------------------------ counts
    @property
    def expected(self) -> int:
        """Samples expected: exact for the inputs that reported, the plan's bound for the others."""
        return self.samples_reported + (self.inputs - self.inputs_done) * self.per_input

    @property
    def done(self) -> int:
        return self.samples_ok + self.samples_failed

    def rate(self) -> float:
        elapsed = self.clock() - self.t0
        return self.samples_ok / elapsed if elapsed > 0 else 0.0

    # ------------------------------------------------------------------ events
    def input_reported(self, n_samples: int | None, ok: bool) -> None:
        with self._lock:
            self.inputs_done += 1
            self.samples_reported += int(n_samples or 0)
            if not ok:
                self.inputs_failed += 1
            self._show()

    def sample_done(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.samples_ok += 1
            else:
                self.samples_failed += 1
            self._last_change = now = self.clock()
            recent = self._recent
            if recent and now - recent[-1][0] < ETA_POINT_S:
                # samples arrive in bursts (a generation batch at a time): a burst is one point,
                # timed at its end, or the first burst would count as done in no time
                recent[-1] = (recent[-1][0], now, self.done)
            else:
                recent.append((now, now, self.done))
            # keep one point at or before the window's start, so the window spans ETA_WINDOW_S
            while len(recent) > 2 and recent[1][1] <= now - ETA_WINDOW_S:
                recent.popleft()
            self._show()

    def shard_written(self) -> None:
        self.shards += 1

    def close(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        if self.bar is not None:
            self._update_bar()
            self.bar.close()
            self.bar = None
        elif self.enabled and self.done != self._last_count:
            self._line()

    # ------------------------------------------------------------------ display
    def line(self) -> str:
        expected = max(self.expected, self.done)
        pct = 100.0 * self.done / expected if expected else 100.0
        elapsed = self.clock() - self.t0
        parts = [
            f"progress: {self.done}/{expected} samples ({pct:.0f}%)",
            f"{self.inputs_done}/{self.inputs} inputs",
        ]
        if self.samples_failed or self.inputs_failed:
            parts.append(f"failed: {self.samples_failed} samples, {self.inputs_failed} inputs")
        parts.append(f"{self.rate():.3f} pairs/s")
        # since generation began (the references and the start profile before it are logged apart)
        parts.append(f"{_clock(elapsed)} generating")
        left = self.seconds_left()
        if left is not None:
            parts.append(f"~{_clock(left)} left")
        return ", ".join(parts)

    def seconds_left(self) -> float | None:
        """The samples still expected at the rate of the last ETA_WINDOW_S (from the first sample
        done on: the start-up is not counted); None until two counts are apart in time."""
        expected = max(self.expected, self.done)
        if len(self._recent) < 2 or expected <= self.done:
            return None
        (_, t_a, n_a), (_, t_b, n_b) = self._recent[0], self._recent[-1]
        # the time since the last count counts too: a pipeline that slowed down shows it
        span = max(t_b, self.clock()) - t_a
        if span <= 0 or n_b <= n_a:
            return None
        return (expected - self.done) * span / (n_b - n_a)

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last_line = self.clock()
        self._last_count = self.done

    def _update_bar(self) -> None:
        bar = self.bar
        bar.total = max(self.expected, self.done)
        bar.n = self.done
        bar.set_postfix_str(
            f"{self.inputs_done}/{self.inputs} inputs, {self.rate():.3f} pairs/s", refresh=False
        )
        bar.refresh()

    def stall_line(self) -> str:
        """What is shown while no sample has completed for ``stall_s`` seconds."""
        quiet = self.clock() - self._last_change
        line = f"waiting: no sample completed in the last {_clock(quiet)} ({self.done} done so far)"
        return f"{line}; {self.stall_hint}" if self.stall_hint else line

    def tick(self) -> None:
        """One watchdog step (every ``interval_s``): a count the interval held back, or a stall."""
        with self._lock:
            if self.bar is None and self.done != self._last_count and self._last_count >= 0:
                self._show()
            quiet = self.clock() - self._last_change
            if self.stall_s > 0 and quiet >= self.stall_s and self.clock() - self._last_stall >= self.stall_s:
                self._last_stall = self.clock()
                if self.bar is not None:
                    self.bar.write(self.stall_line(), file=self.stream)
                else:
                    print(self.stall_line(), file=self.stream, flush=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def _show(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self._update_bar()
            return
        if self.done == self._last_count:
            return
        if self._last_line >= 0 and self.clock() - self._last_line < self.interval_s:
            return
        self._line()
