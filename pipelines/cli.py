"""The ``realdgen`` command line: one entry, one subcommand per task.

Adding a subcommand: write ``def _configure_x(parser)`` (arguments) and ``def _run_x(args) -> int``
(exit status), and add a :class:`Command` to :data:`COMMANDS`. Keep heavy imports inside the run
function so that ``realdgen --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DATASET_HELP = "dataset URI: a local folder, file://… or s3://bucket/prefix"
ENDPOINT_HELP = "S3 endpoint URL (default: $AWS_ENDPOINT_URL); credentials always come from the environment"


def _endpoint(value: str) -> str:
    """An S3 endpoint URL without credentials in it (they come from the environment only)."""
    from pipelines.storage import endpoint_secret

    if not value.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError("must start with http:// or https://")
    secret = endpoint_secret(value)
    if secret:
        what = "credentials (user:password@; not shown)"
        if secret == "query":
            what = "credentials or anything after '?' or '#' (not shown)"
        raise argparse.ArgumentTypeError(f"must not hold {what}; set them in the environment")
    return value


def _local_folder(value: str) -> str:
    """export's out_dir: a local path, never a URI."""
    from pipelines.export import local_folder_problem

    why = local_folder_problem(value)
    if why:
        raise argparse.ArgumentTypeError(why)
    return value


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -- export -------------------------------------------------------------------------------------


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_argument(
        "out_dir", type=_local_folder, help="local folder to write hr/, lr/ and the meta files into"
    )
    p.add_argument("--endpoint", default=None, type=_endpoint, help=ENDPOINT_HELP)
    p.add_argument("--limit", type=int, default=None, help="stop after this many pairs")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="copy PNG bytes without decoding them to check sizes (faster)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in out_dir (its hr/, lr/ and meta files); refused otherwise",
    )


def _cannot_read(dataset: str, exc: BaseException, own: tuple[type[BaseException], ...] = ()) -> str | None:
    """One line for a dataset that could not be read: a file or format error (``OSError``,
    ``ValueError``) or a storage failure that is not an ``OSError`` (botocore's endpoint and HTTP
    client errors, refused credentials); an ``own`` error (one that names its own object, such as
    an output that cannot be written) as it is; None for anything else, which stays a traceback."""
    from pipelines.storage import StorageAccessError, TransientStorageError, access_refused, is_transient

    if isinstance(exc, own):
        return str(exc)
    if isinstance(exc, TransientStorageError):  # retried for its budget; it names what and why
        return f"cannot read {dataset}: {exc}"
    # credentials first: s3fs raises a refused signature as a PermissionError (an OSError)
    why = str(exc) if isinstance(exc, StorageAccessError) else access_refused(exc)
    if why is None and isinstance(exc, (OSError, ValueError)):
        return f"cannot read {dataset}: {exc}"
    if why is None and (
        is_transient(exc) or type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp")
    ):
        why = f"storage unavailable: {type(exc).__name__}: {exc} (check --endpoint / AWS_ENDPOINT_URL)"
    return None if why is None else f"cannot read {dataset}: {why}"


def _run_export(args: argparse.Namespace) -> int:
    """Exit 0: every sample exported; 1: some lost or skipped (counted in export.json), or none
    written; 2: the dataset could not be read or out_dir holds an earlier export."""
    from pipelines.export import export_dataset

    try:
        result = export_dataset(
            args.dataset,
            args.out_dir,
            endpoint_url=args.endpoint,
            limit=args.limit,
            verify=not args.no_verify,
            overwrite=args.overwrite,
        )
    except Exception as exc:
        message = _cannot_read(args.dataset, exc, own=(FileExistsError,))
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=1))
    if result.lost:
        print(
            f"warning: {result.lost} sample(s) not exported ({dict(result.skipped)}; export.json)",
            file=sys.stderr,
        )
    return 0 if result.pairs > 0 and not result.lost else 1


# -- inspect ------------------------------------------------------------------------------------


def _configure_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_argument("--endpoint", default=None, type=_endpoint, help=ENDPOINT_HELP)
    p.add_argument(
        "--contact-sheet",
        metavar="PNG",
        default=None,
        help="write a contact sheet of random pairs here (HR | LR upscaled nearest to HR size)",
    )
    p.add_argument("--pairs", type=int, default=8, help="pairs on the contact sheet (default 8)")
    p.add_argument("--columns", type=int, default=1, help="pairs per contact-sheet row (default 1)")
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="cell size in pixels (default: the largest HR side; larger HR is shrunk)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the contact-sheet draw (default 0)")
    p.add_argument("--max-shards", type=int, default=None, help="only look at the first N shards")


def _run_inspect(args: argparse.Namespace) -> int:
    from pipelines.inspect_shards import ContactSheetError, inspect_dataset

    try:
        report = inspect_dataset(
            args.dataset,
            endpoint_url=args.endpoint,
            contact_sheet_path=args.contact_sheet,
            n_pairs=args.pairs,
            seed=args.seed,
            tile=args.tile,
            columns=args.columns,
            max_shards=args.max_shards,
        )
    except Exception as exc:
        message = _cannot_read(args.dataset, exc, own=(ContactSheetError,))
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1))
    return 0


# -- validate -----------------------------------------------------------------------------------


def _configure_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help=DATASET_HELP)
    p.add_argument("--endpoint", default=None, type=_endpoint, help=ENDPOINT_HELP)
    p.add_argument("--scale", type=int, default=None, help="require this scale in every sample")
    p.add_argument(
        "--no-decode",
        action="store_true",
        help="check structure and json only, do not decode the images (faster)",
    )
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--max-problems", type=int, default=20, help="problems to print (default 20)")


def _run_validate(args: argparse.Namespace) -> int:
    from pipelines.inspect_shards import check_contract

    try:
        report = check_contract(
            args.dataset, endpoint_url=args.endpoint, scale=args.scale, decode_images=not args.no_decode
        )
    except Exception as exc:
        message = _cannot_read(args.dataset, exc)
        if message is None:
            raise
        print(message)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        for p in report.problems[: args.max_problems]:
            print("problem:", p)
        if len(report.problems) > args.max_problems:
            print(f"... and {len(report.problems) - args.max_problems} more")
    verdict = "ok" if report.ok else f"{len(report.problems)} problems"
    print(f"validate: {report.shards} shards, {report.samples} samples, {verdict}")
    return 0 if report.ok else 1


COMMANDS: list[Command] = [
    Command(
        "export",
        "write a dataset as hr/ and lr/ folders plus BasicSR/Real-ESRGAN meta files",
        "Export paired PNG folders (bytes copied verbatim) and the meta_info files of BasicSR's "
        "PairedImageDataset and Real-ESRGAN's RealESRGANPairedDataset. See docs/downstream.md.",
        _configure_export,
        _run_export,
    ),
    Command(
        "inspect",
        "print dataset statistics (JSON) and optionally a contact sheet",
        "Counts per generator and scale, tau and content/degradation error histograms, failures by "
        "reason from the parquet rows with status != ok, totals; with --contact-sheet a PNG of "
        "random pairs (seeded).",
        _configure_inspect,
        _run_inspect,
    ),
    Command(
        "validate",
        "check a dataset against the output contract (exit 0 ok, 1 problems, 2 unreadable)",
        "Check shard names, completion markers, parquet presence, tar structure, keys, members, "
        "image modes and sizes (hr = scale x lr), json fields and _index.json counts/bytes/digests "
        "(ARCHITECTURE.md section 5).",
        _configure_validate,
        _run_validate,
    ),
]


# Entry points that own their argument parsing: `realdgen generate ARGS…` is exactly
# `python pipelines/generate_dataset.py ARGS…` (same for train and evaluate).
PASSTHROUGH: dict[str, tuple[str, str]] = {
    "generate": (
        "pipelines.generate_dataset",
        "run the generation job on a manifest (see `realdgen generate --help`)",
    ),
    "train": (
        "pipelines.train",
        "train or adapt RealDGen from a train manifest (see `realdgen train --help`)",
    ),
    "evaluate": ("pipelines.evaluate", "held-out measures of a checkpoint (see `realdgen evaluate --help`)"),
}


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="realdgen",
        description="RealDGen: realistic (HR, LR) super-resolution training pairs. "
        "Run `realdgen COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)
    for c in commands:
        p = sub.add_parser(c.name, help=c.help, description=c.description)
        c.configure(p)
        p.set_defaults(_run=c.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            if argv and argv[0] in PASSTHROUGH:
                import importlib

                module = importlib.import_module(PASSTHROUGH[argv[0]][0])
                code = int(module.main(argv[1:], prog=f"realdgen {argv[0]}") or 0)
            else:
                args = build_parser().parse_args(argv)
                code = int(args._run(args) or 0)
        except SystemExit:  # --help, a usage error: what was printed is flushed here, below
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # here, not in the interpreter's exit, where a closed pipe is an error
        return code
    except BrokenPipeError:
        # the reader went away (`realdgen inspect out | head`): stop quietly with SIGPIPE's status, as
        # the shell's tools do. The work is done; the interpreter's teardown is skipped (it would
        # flush stdout into the closed pipe again, and a native library's thread pool aborted it).
        sys.stderr.flush()
        os._exit(141)


if __name__ == "__main__":
    sys.exit(main())
