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
    # retried as an outage for the budget (120 s by default; the retries log the endpoint hint)
    monkeypatch.setenv("REALDGEN_STORAGE_RETRY_S", "1")
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    extra = [str(tmp_path / "out")] if command == "export" else []
    assert main([command, "s3://bucket/ds", *extra, "--endpoint", endpoint]) == 2
    out = capsys.readouterr()
    text = (out.err + out.out).strip()
    assert "cannot read s3://bucket/ds: " in text and "storage unavailable for " in text, text
    assert "EndpointConnectionError" in text and text.count("AWS_ENDPOINT_URL") == 1, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text


def test_an_endpoint_with_credentials_is_refused_without_echoing_them(capsys):
    for command in ("inspect", "validate"):
        with pytest.raises(SystemExit) as exc:
            main([command, "s3://b/ds", "--endpoint", "http://AKIAFAKE:SUPERSECRET@127.0.0.1:9"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--endpoint: must not hold credentials" in err
        assert "SUPERSECRET" not in err and "AKIAFAKE" not in err


def test_export_refuses_a_uri_out_dir_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """`realdgen export DS s3://b/x` used to write a local folder named `s3:` and exit 0."""
    from pipelines.export import export_dataset

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path / "ds"), "s3://bucket/exported"])
    assert exc.value.code == 2
    assert "out_dir: must be a local folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"out_dir 's3://bucket/x': must be a local folder"):
        export_dataset(str(tmp_path / "ds"), "s3://bucket/x")
    assert not any(tmp_path.iterdir())


def test_refused_credentials_read_as_such_in_the_cli_tools():
    """s3fs raises a refused signature as PermissionError (an OSError): the tools named it as the
    raw S3 text; they now say what the generation job says (check the credentials)."""
    from botocore.exceptions import ClientError

    from pipelines.cli import _cannot_read

    cause = ClientError(
        {
            "Error": {
                "Code": "SignatureDoesNotMatch",
                "Message": "The request signature we calculated does not match",
            },
            "ResponseMetadata": {"HTTPStatusCode": 403},
        },
        "ListObjectsV2",
    )
    try:
        try:
            raise cause
        except ClientError as e:
            raise PermissionError("The request signature we calculated does not match") from e
    except PermissionError as e:
        msg = _cannot_read("s3://b/ds", e)
    assert msg.startswith("cannot read s3://b/ds: access refused by storage"), msg
    assert "AWS_SECRET_ACCESS_KEY" in msg
    # a local file's PermissionError stays about the file
    assert _cannot_read("/x", PermissionError(13, "Permission denied", "/x/_index.json")) == (
        "cannot read /x: [Errno 13] Permission denied: '/x/_index.json'"
    )


@pytest.mark.parametrize("command", ["inspect", "validate"])
def test_an_aws_endpoint_url_with_credentials_is_refused_at_once(capsys, monkeypatch, command):
    """The manifest and --endpoint refuse user:password@; AWS_ENDPOINT_URL holding them made botocore
    refuse every request with an HTTP client error that was retried as an outage for two minutes."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://AKIAFAKE:SUPERSECRET@127.0.0.1:9")
    monkeypatch.setenv("REALDGEN_STORAGE_RETRY_S", "300")  # a retry would show as a hang
    assert main([command, "s3://bucket/ds"]) == 2
    out = capsys.readouterr()
    text = (out.err + out.out).strip()
    assert "AWS_ENDPOINT_URL must not hold credentials" in text, text
    assert "SUPERSECRET" not in text and "AKIAFAKE" not in text and "Traceback" not in text
