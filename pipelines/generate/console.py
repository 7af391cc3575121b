"""What the job prints, and what it keeps off the console (Ray Data's progress notice, Ray core's
native driver errors a user cannot act on)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

__all__ = ["quiet_ray_data_progress", "native_stderr_to", "driver_native_log_path"]


def quiet_ray_data_progress() -> None:
    """Send Ray Data's progress-module records to Ray Data's session log file only.

    The job turns Ray Data's progress bars off because it shows its own progress; Ray Data's
    progress module then logs, once, a warning that its bars are disabled. Its records go to the
    ``ray-data.log`` file handler that Ray Data's logging configuration attaches to ``ray.data``
    (or nowhere, under a custom configuration without one); every other Ray Data record keeps its
    console handler.
    """
    try:
        from ray.data._internal.logging import SessionFileHandler
    except ImportError:  # another Ray layout: leave Ray Data's logging as it is
        return
    files = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, SessionFileHandler)]
    progress = logging.getLogger("ray.data._internal.progress")
    progress.propagate = False
    for h in files:
        if h not in progress.handlers:
            progress.addHandler(h)


RAY_DATA_ABORT_LOGGER = "ray.data._internal.execution.streaming_executor_state"
IGNORE_ADVICE = " To ignore this exception and continue, set DataContext.max_errored_blocks."


class _NoIgnoreAdvice(logging.Filter):
    """Cuts Ray Data's advice to ignore a failed task from its abort record: the job's own error
    line follows it and says what to do (an outage: run again; a failure budget), and a job that
    skipped the failed blocks would finish with holes in its shards."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and IGNORE_ADVICE in record.msg:
            record.msg = record.msg.replace(IGNORE_ADVICE, "")
        return True


def drop_ray_data_ignore_advice() -> None:
    """Install :class:`_NoIgnoreAdvice` on Ray Data's abort logger (once)."""
    logger = logging.getLogger(RAY_DATA_ABORT_LOGGER)
    if not any(isinstance(f, _NoIgnoreAdvice) for f in logger.filters):
        logger.addFilter(_NoIgnoreAdvice())


@contextlib.contextmanager
def native_stderr_to(path: str | None):
    """While inside: native writes to file descriptor 2 go to ``path``; Python's ``sys.stderr``
    (the job's progress and messages, Ray's Python loggers, tracebacks) keeps the console.

    Ray core's C++ logger in a driver writes every ERROR record both to the driver's log file
    (``python-core-driver-*.log`` in the session's log folder) and to stderr, unlike Ray's other
    processes, whose native stderr Ray itself sends to files. Ray Data creates its actors with
    restarts on and its own state as object-store arguments, for which Ray core logs an
    ``E core_worker.cc`` line per driver (ray-project/ray #53727, #57733) that a user cannot act
    on. Sending the driver's native stderr to a file in the same log folder keeps such records
    (a copy of what the driver log holds) off the console and out of ``ray job logs``; worker
    errors still reach both, as Python exceptions and Ray Data's log records. ``None``: no change.
    """
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    # In sys.stderr's encoding, not the locale's: they differ where PYTHONIOENCODING sets stderr's
    # (UTF-8 over a cp1252 locale on Windows), and τ and → then came out as escapes. What the
    # encoding cannot hold is escaped, as stderr does. (A Windows console is UTF-8 either way.)
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    console = open(os.dup(2), "w", buffering=1, encoding=encoding, errors="backslashreplace")  # noqa: SIM115
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    previous = sys.stderr
    # Logging handlers created earlier (Ray's own among them) hold the old stderr object.
    handlers = [
        h
        for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for h in getattr(lg, "handlers", [])
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is previous
    ]
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = console
    for h in handlers:
        h.setStream(console)
    try:
        yield
    finally:
        console.flush()
        for h in handlers:
            h.setStream(previous)
        sys.stderr = previous
        os.dup2(saved, 2)
        os.close(saved)
        console.close()


def ray_logs_dir() -> str | None:
    """This Ray session's log folder (the node this process belongs to), or None when unknown."""
    try:
        import ray

        return ray._private.worker._global_node.get_logs_dir_path() or None
    except Exception:
        return None


def driver_native_log_path() -> str | None:
    """``realdgen-driver-<pid>.err`` in this Ray session's log folder, or None when unknown."""
    logs = ray_logs_dir()
    return None if logs is None else os.path.join(logs, f"realdgen-driver-{os.getpid()}.err")
