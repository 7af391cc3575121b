"""The generation job's entry point: HR content + real LR references → paired WebDataset shards
(ARCHITECTURE §5).

    python pipelines/generate_dataset.py manifests/demo.yaml            # embedded local Ray
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python pipelines/generate_dataset.py manifests/cluster.yaml     # on a cluster

Flow (the code lives in :mod:`pipelines.generate`): validate the manifest and check its
checkpoint and sources (no Ray yet: a bad manifest exits 2 before any work) → start or join Ray
→ take the output lock → list the inputs in a Ray task that writes the plan as parquet blocks
(resume / refuse / overwrite then looks at the output) → prepare the reference bank once (a Ray
task) → Ray Data streams the plan blocks through ``DecodeTile`` (CPU tasks) → ``GenerateLR``
(actor pool, one GPU per actor or CPU actors) → encode + part files (CPU tasks, on the workers)
→ the driver counts each shard's inputs and samples and, once a shard is whole, a compaction
task on a worker writes its tar, parquet and ``_stats.json`` (last) → ``_index.json`` → preview
and summary. See docs/generate.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable here and in workers
    _ROOT = str(Path(__file__).resolve().parent.parent)
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

from pipelines.generate.job import (  # noqa: E402
    FAILURES_SHOWN,
    GenerateJob,
    JobFailed,
    StorageUnavailable,
    ensure_ray,
    run,
    what_changed,
)
from pipelines.generate.plan import Plan, checkpoint_calibration, make_plan  # noqa: E402
from pipelines.manifest import ManifestError, add_set_option, load_manifest, manifest_json_schema  # noqa: E402
from pipelines.storage import (  # noqa: E402
    EXIT_TEMPFAIL,
    LockError,
    RunLock,
    StorageAccessError,
    TransientStorageError,
    missing_credentials,
)

__all__ = ["Plan", "GenerateJob", "JobFailed", "ensure_ray", "make_plan", "run", "main", "EXIT_TEMPFAIL"]

# Kept under its old name: tests and tools read a checkpoint's calibration through it.
_checkpoint_calibration = checkpoint_calibration


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _exit_now(code: int) -> None:
    os._exit(code)


def _leave_now(signum, frame) -> None:
    """A second Ctrl-C while the job unwinds: out at once (the run has released its lock by then,
    or, when it comes sooner, the next run takes it over)."""
    print("interrupted again: leaving now", file=sys.stderr, flush=True)
    _exit_now(130)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=prog or "generate_dataset.py",
        description="Generate paired (HR, realistic LR) WebDataset shards.",
    )
    ap.add_argument("manifest", nargs="?", help="manifest YAML (kind: generate)")
    add_set_option(ap, "compute.batch_size=4")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit without generating")
    ap.add_argument("--print-schema", action="store_true", help="print the manifest JSON schema and exit")
    args = ap.parse_args(argv)
    if args.print_schema:
        print(json.dumps(manifest_json_schema("generate"), indent=2))
        return 0
    if not args.manifest:
        ap.error("a manifest is required")
    try:
        m = load_manifest(args.manifest, args.overrides, kind="generate")
        # Checks the checkpoint and every source before any work; --dry-run also lists here.
        plan = make_plan(m, list_now=args.dry_run)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TransientStorageError as exc:
        print(f"error: {exc}; nothing was written, run the command again", file=sys.stderr)
        return EXIT_TEMPFAIL
    except StorageAccessError as exc:
        print(f"error: {exc}; nothing was written", file=sys.stderr)
        return 2
    except Exception as exc:
        why = missing_credentials(exc)
        if why is None:
            raise
        print(f"error: {why}", file=sys.stderr)
        return 2
    job = GenerateJob(m, log=lambda s: print(s, file=sys.stderr, flush=True), native_stderr_to_log=True)
    if args.dry_run:
        complete: set[str] = set()
        conflict = None
        try:
            # as the run judges them (digests of manifest, model and listing compared), without acting
            _, complete, _, foreign, stray, why = job.classify_output(plan)
            if foreign or stray:
                act = "refuse to start (output.mode resume)"
                if m.output.mode == "overwrite":
                    act = "delete them"
                conflict = (
                    f"{len(foreign) + len(stray)} files of another dataset (here: "
                    f"{what_changed(why, job.manifest_changes)}; e.g. "
                    f"{(foreign or stray)[:3]}): the run would {act}"
                )
                complete = set()
        except (TransientStorageError, StorageAccessError, OSError) as exc:
            conflict = f"the output could not be read ({exc}): its shards were not counted"
        c = m.compute
        # without actors.max the run takes the GPUs present at its start (unknown here)
        desc = job.describe(plan, complete, (c.actors.min, c.actors.max))
        desc["output_conflict"] = conflict
        print(json.dumps(desc, indent=2))
        return 0
    previous = None
    sigint_before = None
    started_ray = False
    uri = job.store.uri

    def on_sigterm(signum, frame) -> None:
        print(
            f"interrupted (SIGTERM, e.g. `ray job stop`): complete shards in {uri} are kept; "
            "run the same command again to resume",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(signum)

    try:
        # another live job here writing this output: refused now, not after Ray's start-up (judged
        # with the heartbeat the run's own lock uses, so a holder it would take over passes here)
        RunLock(job.store, heartbeat_s=job.m.progress.heartbeat_s).refuse_if_live_here()
    except LockError as exc:
        print(f"error: {exc}", file=sys.stderr)  # it names the output
        return 1
    except Exception:  # only a look ahead: the run takes the lock itself and says why it cannot
        pass
    try:
        if threading.current_thread() is threading.main_thread():
            # `ray job stop` / a scheduler's SIGTERM: say so at once (`ray job stop` kills the driver
            # 3 s later), then unwind like Ctrl-C (job.run's finally releases the lock). Installed
            # after ray.init, which sets a handler of its own (sys.exit alone) that would replace it.
            started_ray = ensure_ray()
            previous = signal.signal(signal.SIGTERM, on_sigterm)
        summary = job.run(plan)
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        return 128 + signal.SIGTERM
    except ManifestError as exc:  # found by the listing (no images after all, colliding keys)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StorageUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TEMPFAIL
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        ray_exceptions = sys.modules.get("ray.exceptions")
        if ray_exceptions is None or not isinstance(exc, ray_exceptions.RayError):
            raise
        # Ray gave up on work (a node lost past its retries, an actor that kept dying). Its
        # traceback carries the remote error, so it stays; the last line says what is kept and
        # what to do. Exit 1, not 75: a deterministic error in a task fails the same way again.
        traceback.print_exc()
        print(
            f"error: Ray gave up on the job's work ({type(exc).__name__}; above); complete shards in "
            f"{uri} are kept: if a node was lost, run the same command again to resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the lock is released on the way out (job.run's finally)
        if threading.current_thread() is threading.main_thread():
            # a second Ctrl-C while Ray shuts down ended in a traceback and no exit status: it
            # now leaves at once, with a line and 130 (a Ray that hangs on the way out is not
            # waited for)
            sigint_before = signal.signal(signal.SIGINT, _leave_now)
        print(
            f"interrupted: complete shards in {job.store.uri} are kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if started_ray:  # job.run shuts down only a Ray it started itself
            import ray

            ray.shutdown()
        if sigint_before is not None:
            signal.signal(signal.SIGINT, sigint_before)
    print(
        f"done: {summary['pairs']} pairs in {summary['shards_written']} shards "
        f"({summary['shards_skipped']} already complete), "
        f"{summary['inputs_failed']} of {summary['inputs']} inputs failed"
        + (
            f", {summary['references_skipped']} references skipped"
            if summary.get("references_skipped")
            else ""
        )
        + f", {summary['seconds']} s "
        f"({summary['generate_seconds']} s generating: {summary['pairs_per_s']} pairs/s) "
        f"-> {summary['output']}",
        file=sys.stderr,
    )
    examples = summary.get("failure_examples") or []
    for failure in examples[:FAILURES_SHOWN]:
        print(f"failed: {failure}", file=sys.stderr)
    if summary["inputs_failed"] > min(len(examples), FAILURES_SHOWN):
        print(
            f"every failure, by reason: realdgen inspect {summary['output']}; each one with its URI: the "
            "shards' parquet files (status != 'ok')",
            file=sys.stderr,
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
