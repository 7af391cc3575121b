"""The dependency locks: complete, exact, CPU-only where they should be, and the installed-set check."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
REQ = REPO / "requirements"

spec = importlib.util.spec_from_file_location("check_lock", REQ / "check_lock.py")
check_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_lock)


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


@pytest.mark.parametrize("lock", ["lock-cpu.txt", "lock-gpu.txt"])
def test_lock_pins_every_requirement_of_pyproject_exactly(lock):
    pins = check_lock.read_lock(REQ / lock)  # raises on any line that is not an exact pin
    for req in _pyproject_requirements():
        name = check_lock.canonical(req.name)
        assert name in pins, f"{lock} lacks {req.name} (run bash requirements/refresh-lock.sh)"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])


def test_cpu_lock_has_the_cpu_torch_and_no_cuda_wheels_gpu_lock_has_torch_2_11():
    cpu = check_lock.read_lock(REQ / "lock-cpu.txt")
    gpu = check_lock.read_lock(REQ / "lock-gpu.txt")
    assert cpu["torch"] == "2.13.0+cpu"
    assert not [n for n in cpu if re.match(r"nvidia-|triton$|cuda-", n)]
    assert gpu["torch"] == "2.11.0" and any(n.startswith("nvidia-") for n in gpu)
    # everything but torch and its CUDA stack is the same in both
    shared = {n: v for n, v in cpu.items() if n not in ("torch", "setuptools")}
    assert {n: gpu.get(n) for n in shared} == shared


def test_cpu_lock_gives_macos_and_windows_pypis_torch_of_the_same_version():
    """The +cpu build is Linux-only; PyPI's macOS and Windows wheels of 2.13.0 are CPU builds, so
    there the lock pins those (a `+cpu` pin would find no wheel). Everything else is the same."""
    linux = check_lock.read_lock(REQ / "lock-cpu.txt", {"sys_platform": "linux"})
    for platform in ("darwin", "win32"):
        other = check_lock.read_lock(REQ / "lock-cpu.txt", {"sys_platform": platform})
        assert other["torch"] == "2.13.0" and linux["torch"] == "2.13.0+cpu"
        assert {n: v for n, v in other.items() if n != "torch"} == {
            n: v for n, v in linux.items() if n != "torch"
        }


def test_check_lock_refuses_a_package_pinned_twice_for_one_platform(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text('a==1.0 ; sys_platform == "linux"\na==2.0 ; sys_platform != "win32"\n')
    assert check_lock.read_lock(lock, {"sys_platform": "win32"}) == {}
    assert check_lock.read_lock(lock, {"sys_platform": "darwin"}) == {"a": "2.0"}
    with pytest.raises(SystemExit, match="pinned twice"):
        check_lock.read_lock(lock, {"sys_platform": "linux"})


def test_check_lock_reports_missing_extra_and_other_versions():
    lock = {"a": "1.0", "b": "2.0", "torch": "2.13.0+cpu"}
    have = {"a": "1.0", "b": "2.1", "c": "3.0", "pip": "26.0", "realdgen": "0.1.0"}
    problems = check_lock.compare(lock, have)
    assert problems == [
        "b: installed 2.1, lock pins 2.0",
        "c==3.0 is installed but not in the lock",
        "torch==2.13.0+cpu is in the lock but not installed",
    ]
    assert check_lock.compare(lock, {**lock, "pip": "1"}) == []


def test_ci_installs_from_the_lock_checks_it_and_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert 'pip install -q -c requirements/lock-cpu.txt -e ".[test]"' in ci
    assert "python requirements/check_lock.py requirements/lock-cpu.txt" in ci
    test_cmd = 'python -m pytest -m "not slow" -q'
    assert ci.strip().splitlines()[-1] == test_cmd and test_cmd in readme
    assert 'pip install -c requirements/lock-cpu.txt -e ".[test]"' in readme
