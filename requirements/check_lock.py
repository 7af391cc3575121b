"""Compare the packages installed in this environment with a lock file; exit 1 on any mismatch.

    python requirements/check_lock.py [requirements/lock-cpu.txt]

Every distribution installed (``importlib.metadata``) must be pinned in the lock at the same version,
and every pin in the lock must be installed. The project itself (``realdgen``) and pip are not
pinned and are ignored. A pin with an environment marker (``torch==2.13.0+cpu ; sys_platform ==
"linux"``) counts only where its marker holds, as pip reads it; markers are evaluated with
``packaging`` (pinned in the lock; pip's own copy where it is not installed yet).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

IGNORED = {"realdgen", "pip"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;#]+)\s*(?:;([^#]*))?")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path, environment: dict[str, str] | None = None) -> dict[str, str]:
    """{name: version} of the pins that apply here (or in ``environment``: marker variables to
    override, e.g. ``{"sys_platform": "darwin"}``)."""
    pins: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", "-")):
            continue
        m = PIN.match(line)
        if m is None:
            raise SystemExit(f"{path}:{n}: not an exact pin: {line!r}")
        marker = (m.group(4) or "").strip()
        if marker and not marker_holds(marker, environment):
            continue
        name = canonical(m.group(1))
        if name in pins:
            raise SystemExit(f"{path}:{n}: {name} is pinned twice for this environment: {line!r}")
        pins[name] = m.group(3)
    return pins


def marker_holds(marker: str, environment: dict[str, str] | None = None) -> bool:
    try:
        from packaging.markers import Marker
    except ImportError:  # before the install: pip carries its own copy
        from pip._vendor.packaging.markers import Marker
    return Marker(marker).evaluate(environment)


def installed() -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonical(name)] = dist.version
    return found


def compare(lock: dict[str, str], have: dict[str, str]) -> list[str]:
    problems = []
    for name in sorted(set(lock) | set(have)):
        if name in IGNORED:
            continue
        want, got = lock.get(name), have.get(name)
        if want is None:
            problems.append(f"{name}=={got} is installed but not in the lock")
        elif got is None:
            problems.append(f"{name}=={want} is in the lock but not installed")
        elif got != want:
            problems.append(f"{name}: installed {got}, lock pins {want}")
    return problems


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else Path(__file__).with_name("lock-cpu.txt"))
    lock = read_lock(path)
    problems = compare(lock, installed())
    if problems:
        print(f"installed packages differ from {path} ({len(problems)}):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print("install with: pip install -c requirements/lock-cpu.txt -e '.[test]'", file=sys.stderr)
        return 1
    print(f"installed packages match {path} ({len(lock)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
