"""JobProgress's plain-line display: the interval limit, a count it held back, and stalls."""

from __future__ import annotations

import io

from pipelines.progress import JobProgress


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def progress(clock: Clock, **kw) -> tuple[JobProgress, io.StringIO]:
    out = io.StringIO()
    kw.setdefault("interval_s", 5.0)
    p = JobProgress(3, 1, stream=out, tty=False, clock=clock, **kw)
    return p, out


def test_a_count_held_back_by_the_interval_is_shown_by_the_next_tick_and_a_stall_is_named():
    clock = Clock()
    p, out = progress(clock, stall_s=60.0, stall_hint="the workers' warnings are in /x/worker-*.err")
    p._stop.set()  # drive the watchdog by hand
    p._watchdog.join()
    clock.t = 1.0
    p.input_reported(1, True)
    p.sample_done(True)  # shown at once: the first line
    clock.t = 2.0
    p.input_reported(1, True)
    p.sample_done(True)  # within the interval: held back
    assert out.getvalue().count("progress:") == 1
    clock.t = 3.0
    p.tick()  # still within the interval
    assert out.getvalue().count("progress:") == 1
    clock.t = 7.0
    p.tick()  # the held-back count, although no sample came since
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("progress: 2/3 samples (67%), 2/3 inputs"), lines
    p.tick()  # nothing new: nothing shown
    assert len(out.getvalue().splitlines()) == 2
    clock.t = 61.0  # 59 s without a sample: no stall yet
    p.tick()
    assert "waiting:" not in out.getvalue()
    clock.t = 63.0
    p.tick()
    assert out.getvalue().splitlines()[-1] == (
        "waiting: no sample completed in the last 1:01 (2 done so far); "
        "the workers' warnings are in /x/worker-*.err"
    )
    clock.t = 90.0
    p.tick()  # once per stall_s
    assert out.getvalue().count("waiting:") == 1
    clock.t = 123.0
    p.tick()
    assert out.getvalue().count("waiting:") == 2
    assert out.getvalue().splitlines()[-1].startswith("waiting: no sample completed in the last 2:01")
    clock.t = 124.0
    p.input_reported(1, True)
    p.sample_done(True)  # progress again: the stall clock starts over
    clock.t = 180.0
    p.tick()
    assert out.getvalue().count("waiting:") == 2
    p.close()
    assert out.getvalue().splitlines()[-1].startswith("progress: 3/3 samples (100%)")


def test_the_watchdog_runs_in_the_background_and_stops_with_close():
    clock = Clock()
    p, out = progress(clock, interval_s=0.01, stall_s=10.0)
    assert p._watchdog is not None and p._watchdog.is_alive()
    clock.t = 11.0  # a stall, seen by the thread on its own
    for _ in range(500):
        if "waiting:" in out.getvalue():
            break
        p._stop.wait(0.01)
    assert out.getvalue().startswith("waiting: no sample completed in the last 0:11 (0 done so far)\n")
    p.close()
    assert p._watchdog is None


def test_no_watchdog_when_lines_are_off_or_every_event_prints():
    for kw in ({"enabled": False}, {"interval_s": 0}):
        p, _ = progress(Clock(), **kw)
        assert p._watchdog is None
        p.close()


def test_the_time_left_follows_the_recent_rate_not_the_start_up():
    """40 s of start-up with nothing done, then 10 samples/s: the time left is read from that rate
    (it was done/elapsed, which counted the start-up: ~0:47 shown here for 0:20 left)."""
    clock = Clock()
    out = io.StringIO()
    p = JobProgress(100, 5, stream=out, tty=False, clock=clock, interval_s=0.0)
    for i in range(100):
        clock.t = 40.0 + i * 0.1
        p.input_reported(5, True)
    assert p.seconds_left() is None  # nothing done yet
    clock.t = 40.0
    p.sample_done(True)
    assert p.seconds_left() is None  # one count: no rate yet
    for i in range(1, 300):  # 10 samples/s from 40 s on
        clock.t = 40.0 + i * 0.1
        p.sample_done(True)
    # 300 of 500 done at 69.9 s; 200 left at 10/s
    assert abs(p.seconds_left() - 20.0) < 0.2, p.seconds_left()
    assert out.getvalue().splitlines()[-1].endswith(", ~0:20 left"), out.getvalue().splitlines()[-1]
    # the pipeline stalls: the wait since the last count stretches the estimate
    clock.t = 99.9
    assert p.seconds_left() > 30
    # ... and only the last minute counts: after a minute at 1 sample/s, it reads 1/s
    for i in range(1, 100):
        clock.t = 99.9 + i
        p.sample_done(True)
    assert abs(p.seconds_left() - 101.0) < 3, p.seconds_left()


def test_the_time_left_is_right_when_samples_come_in_bursts():
    """The driver counts a generation batch sample by sample, microseconds apart: the first burst
    must not count as done in no time (the estimate was half the truth for the first minute)."""
    clock = Clock()
    p = JobProgress(50, 20, stream=io.StringIO(), tty=False, clock=clock, interval_s=0.0)
    for _ in range(50):
        p.input_reported(20, True)  # 1000 samples expected
    for burst in range(5):  # 20 samples every 10 s, from 30 s on
        for j in range(20):
            clock.t = 30.0 + 10 * burst + j * 1e-5
            p.sample_done(True)
        if burst:
            # 2 samples/s: (1000 - done) / 2 seconds left
            want = (1000 - p.done) / 2.0
            assert abs(p.seconds_left() - want) < 0.01 * want, (burst, p.seconds_left(), want)
