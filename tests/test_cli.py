"""The `realdgen` console entry dispatches the job entry points with their own arguments."""

import json

from pipelines.cli import main


def test_generate_passthrough_prints_schema(capsys):
    assert main(["generate", "--print-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    text = json.dumps(schema)
    assert "tau_max" in text and "inputs_per_shard" in text


def test_generate_passthrough_rejects_bad_manifest(tmp_path, capsys):
    from pathlib import Path

    demo = (Path(__file__).parents[1] / "manifests" / "demo.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(demo.replace("seed: 0", "seed: 0\nno_such_key: 1", 1))
    assert main(["generate", str(bad), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "no_such_key: unknown key" in captured.err + captured.out
    assert not (tmp_path / "out").exists()
