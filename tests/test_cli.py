"""The `realdgen` console entry dispatches the job entry points with their own arguments."""

import json

import pytest

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


def test_missing_s3_credentials_is_a_clear_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    """An operator's --dry-run on a machine without S3 credentials: one line saying what to set."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for k in ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata request leaves the host
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    m = tmp_path / "m.yaml"
    m.write_text(
        "kind: generate\nseed: 1\nscale: 2\nhr: {uri: 's3://b/hr'}\n"
        "refs: [{name: c, source: {uri: 's3://b/refs'}}]\n"
        "generator: {kind: realdgen, checkpoint: 's3://b/m.safetensors'}\n"
        f"output: {{uri: '{tmp_path / 'out'}', name: p}}\n"
    )
    assert main(["generate", str(m), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checking s3://b/m.safetensors: no S3 credentials"), (
        err
    )  # names what it read
    assert "AWS_ACCESS_KEY_ID" in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["inspect", "export", "validate"])
def test_an_unreachable_endpoint_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, command):
    """botocore's connection errors are not OSErrors: they used to print a 141-line traceback."""
    from ports import free_ports

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # no backoff between refused connections
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    extra = [str(tmp_path / "out")] if command == "export" else []
    assert main([command, "s3://bucket/ds", *extra, "--endpoint", endpoint]) == 2
    out = capsys.readouterr()
    text = (out.err + out.out).strip()
    assert "cannot read s3://bucket/ds: storage unavailable: EndpointConnectionError" in text
    assert "Traceback" not in text and len(text.splitlines()) == 1


def test_an_endpoint_with_credentials_is_refused_without_echoing_them(capsys):
    for command in ("inspect", "validate"):
        with pytest.raises(SystemExit) as exc:
            main([command, "s3://b/ds", "--endpoint", "http://AKIAFAKE:SUPERSECRET@127.0.0.1:9"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--endpoint: must not hold credentials" in err
        assert "SUPERSECRET" not in err and "AKIAFAKE" not in err
