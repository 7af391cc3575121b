"""realdgen_core stays pure torch/numpy: importing every module pulls in no ray, pydantic, fsspec or s3fs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

FORBIDDEN = ("ray", "pydantic", "fsspec", "s3fs")


def test_core_modules_import_no_cluster_or_storage_libraries():
    code = textwrap.dedent(
        f"""
        import importlib, json, pkgutil, sys
        import realdgen_core
        names = ["realdgen_core"]
        for info in pkgutil.walk_packages(realdgen_core.__path__, "realdgen_core."):
            importlib.import_module(info.name)
            names.append(info.name)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
        print(json.dumps({{"modules": names, "forbidden": bad}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["forbidden"] == [], f"realdgen_core imported {report['forbidden']}"
    # The walk really covered the package (so the check above can fail).
    for name in ("realdgen_core.diffusion", "realdgen_core.generator", "realdgen_core.metrics"):
        assert name in report["modules"]
