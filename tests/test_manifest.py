"""Manifest schema (pipelines/manifest.py): strictness, error messages, overrides, digest."""

from __future__ import annotations

import json

import pytest
import yaml

from pipelines.manifest import (
    GenerateManifest,
    ManifestError,
    apply_overrides,
    load_manifest,
    manifest_digest,
    manifest_json_schema,
    parse_manifest,
)

BASE = {
    "kind": "generate",
    "hr": {"uri": "data/hr"},
    "refs": [{"name": "cam", "source": {"uri": "s3://bucket/refs", "format": "webdataset"}}],
    "generator": {"kind": "bicubic"},
    "output": {"uri": "out"},
}


def write(tmp_path, data, name="m.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_valid_manifest_and_defaults(tmp_path):
    m = load_manifest(write(tmp_path, BASE))
    assert isinstance(m, GenerateManifest)
    assert m.tiling.tile == 64 and m.output.mode == "resume" and m.refs[0].source.format == "webdataset"
    assert m.generator.tau_max is None  # unset: the checkpoint's calibration, else the paper's
    g = m.generator.resolved(None)
    assert (g.tau_min, g.tau_max, g.start_kind) == (0, 300, "realesrgan")  # the paper's (Table 3)
    assert (g.content_weight, g.degradation_weight, g.filter_norm) == (1.0, 1.0, True)


def test_generator_resolves_from_a_domain_calibration():
    from pipelines.manifest import GeneratorSpec
    from realdgen_core.calibrate import DomainCalibration, start_bank

    cal = DomainCalibration("codec", 0, 40, start_bank(4, (0.0, 1.2), (0, 70)), (0.25, 1.0)).to_dict()
    spec = GeneratorSpec(kind="realdgen", checkpoint="c.safetensors", tau_max=90)
    g = spec.resolved(cal)
    # set keys win, unset ones come from the calibration
    assert (g.tau_min, g.tau_max, g.start_kind) == (0, 90, "domain")
    assert (g.content_weight, g.degradation_weight, g.filter_norm) == (0.25, 1.0, True)
    assert [t["ops"] for t in g.start_bank] == [t["ops"] for t in cal["bank"]] and len(g.start_bank) == 4
    off = GeneratorSpec(kind="realdgen", checkpoint="c.safetensors", calibration="off").resolved(cal)
    assert (off.tau_max, off.start_kind, off.start_bank) == (300, "realesrgan", None)
    # the sampler τ was calibrated with is the job's default; none recorded (older calibrations),
    # calibration off or set in the manifest: as set, else the paper's ancestral sampler
    assert (g.sampler, g.sampler_steps, g.sampler_eta) == ("ancestral", 10, 1.0)
    cal_ddim = DomainCalibration(
        "codec", 0, 40, start_bank(4, (0.0,), (0,)), sampler={"kind": "ddim", "steps": 6, "eta": 0.5}
    ).to_dict()
    assert DomainCalibration.from_dict(cal_ddim).sampler == {"kind": "ddim", "steps": 6, "eta": 0.5}
    g2 = GeneratorSpec(kind="realdgen", checkpoint="c.safetensors").resolved(cal_ddim)
    assert (g2.sampler, g2.sampler_steps, g2.sampler_eta) == ("ddim", 6, 0.5)
    g3 = GeneratorSpec(kind="realdgen", checkpoint="c.safetensors", sampler_steps=3).resolved(cal_ddim)
    assert (g3.sampler, g3.sampler_steps) == ("ddim", 3)
    g4 = GeneratorSpec(kind="realdgen", checkpoint="c.safetensors", calibration="off").resolved(cal_ddim)
    assert g4.sampler == "ancestral"
    with pytest.raises(ValueError, match="sampler"):
        DomainCalibration.from_dict({**cal_ddim, "sampler": {"kind": "euler"}})
    # the documented `calibration: off`, bare in YAML (read as false) and through --set
    spec = {**BASE, "generator": {"kind": "realdgen", "checkpoint": "c.safetensors"}}
    text = yaml.safe_dump(spec).replace("kind: realdgen", "kind: realdgen\n  calibration: off")
    bare = parse_manifest(yaml.safe_load(text))
    assert bare.generator.calibration == "off"
    assert apply_overrides(spec, ["generator.calibration=off"])["generator"]["calibration"] is False
    for over, want in (("off", "off"), ("on", "auto"), ("auto", "auto")):
        m = parse_manifest(apply_overrides(spec, [f"generator.calibration={over}"]))
        assert m.generator.calibration == want
    with pytest.raises(ManifestError, match="generator.calibration"):
        parse_manifest(apply_overrides(spec, ["generator.calibration=0"]))
    with pytest.raises(ValueError, match="tau_min .* must be <= tau_max"):
        GeneratorSpec(kind="realdgen", checkpoint="c.safetensors", tau_min=60).resolved(cal)
    with pytest.raises(ValueError, match="needs `start_bank`"):
        GeneratorSpec(kind="realdgen", checkpoint="c.safetensors", start_kind="domain").resolved(None)


@pytest.mark.parametrize(
    "patch,needle",
    [
        ({"tiling": {"tilee": 64}}, "tiling.tilee: unknown key (did you mean 'tile'?) (value 64)"),
        ({"tilling": {"tile": 64}}, "tilling: unknown key (did you mean 'tiling'?)"),
        (
            {"refs": [{"name": "c", "source": {"uri": "r", "formt": "folder"}}]},
            "refs[0].source.formt: unknown key (did you mean 'format'?)",
        ),
        ({"zzz": 1}, "zzz: unknown key (value 1)"),
        ({"tiling": {"tile": "big"}}, "tiling.tile: Input should be a valid integer"),
        ({"tiling": {"tile": 2}}, "tiling.tile: Input should be greater than or equal to 8 (got 2)"),
        ({"generator": {"kind": "gan"}}, "generator.kind: Input should be"),
        ({"generator": {"kind": "realdgen"}}, "needs `checkpoint`"),
        (
            {"generator": {"kind": "bicubic", "tau_min": 5, "tau_max": 1}},
            "tau_min (5) must be <= tau_max (1)",
        ),
        ({"limits": {"max_failure_fraction": 1.5}}, "limits.max_failure_fraction: Input should be less than"),
        ({"output": {"uri": "out", "name": "a.b"}}, "output.name: String should match pattern"),
        ({"output": {"uri": "gs://x"}}, "output.uri: only local paths"),
        (
            {"refs": [{"name": "c", "source": {"uri": "r"}, "weight": 0}]},
            "refs[0].weight: Input should be greater",
        ),
        ({"storage": {"endpoint_url": "127.0.0.1:9000"}}, "storage.endpoint_url: must start with http"),
        ({"compute": {"actors": {"min": 3, "max": 2}}}, "max (2) must be >= min (3)"),
        ({"bogus": 1}, "bogus: unknown key"),
    ],
)
def test_errors_name_the_key_and_value(tmp_path, patch, needle):
    data = {**BASE, **patch}
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, data))
    assert needle in str(info.value), str(info.value)


def test_missing_required_and_file_errors(tmp_path):
    data = dict(BASE)
    del data["output"]
    with pytest.raises(ManifestError, match="output: required key is missing"):
        load_manifest(write(tmp_path, data))
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(tmp_path / "bad.yaml")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    with pytest.raises(ManifestError, match=r"photo.png' is not a text \(UTF-8 YAML\) file"):
        load_manifest(tmp_path / "photo.png")
    with pytest.raises(ManifestError, match="kind: unknown manifest kind"):
        load_manifest(write(tmp_path, {**BASE, "kind": "nope"}))


def test_credentials_are_refused_without_echoing_them(tmp_path):
    data = {**BASE, "storage": {"endpoint_url": "http://x", "aws_secret_access_key": "SUPERSECRET"}}
    with pytest.raises(ManifestError) as info:
        load_manifest(write(tmp_path, data))
    assert "storage.aws_secret_access_key" in str(info.value)
    assert "SUPERSECRET" not in str(info.value)
    # nor in a source or output URI (it would travel in task arguments and records)
    for key in ("hr.uri", "output.uri", "generator.checkpoint"):
        with pytest.raises(ManifestError) as info:
            load_manifest(write(tmp_path, BASE), [f"{key}=s3://AKIAFAKE:SUPERSECRET@bucket/p"])
        assert f"{key}: must not hold credentials (key:secret@bucket)" in str(info.value)
        assert "SUPERSECRET" not in str(info.value) and "AKIAFAKE" not in str(info.value)


def test_overrides(tmp_path):
    p = write(tmp_path, BASE)
    m = load_manifest(
        p, ["compute.batch_size=3", "tiling.mode=random", "refs.0.weight=2.5", "output.preview=false"]
    )
    assert m.compute.batch_size == 3 and m.tiling.mode == "random" and m.refs[0].weight == 2.5
    assert m.output.preview is False
    with pytest.raises(ManifestError, match="compute.batch_size: Input should be greater"):
        load_manifest(p, ["compute.batch_size=0"])
    with pytest.raises(ManifestError, match="expected key.path=value"):
        apply_overrides({}, ["nokey"])
    # text kept as written where YAML would cut it at a comment, fail on it, or make it a date
    m = load_manifest(p, ["hr.uri=/data/phone #2", "refs.0.source.uri=*x", "output.name=2024-05-01"])
    assert (m.hr.uri, m.refs[0].source.uri, m.output.name) == ("/data/phone #2", "*x", "2024-05-01")
    assert apply_overrides({}, ["a='q #1'", "b=[1, 2]", "c=", "d=0.5"]) == {
        "a": "q #1",
        "b": [1, 2],
        "c": None,
        "d": 0.5,
    }


def test_digest_ignores_sizing_but_not_data():
    a = parse_manifest(BASE)
    sizing = parse_manifest(
        {
            **BASE,
            "compute": {"batch_size": 2, "actors": {"min": 2}},
            "progress": {"bar": False},
            "output": {"uri": "out", "mode": "overwrite", "preview": False},
        }
    )
    assert manifest_digest(a) == manifest_digest(sizing)
    for patch in (
        {"seed": 1},
        {"tiling": {"tile": 32}},
        {"generator": {"kind": "bsrgan"}},
        {"output": {"uri": "out", "inputs_per_shard": 3}},
    ):
        assert manifest_digest(parse_manifest({**BASE, **patch})) != manifest_digest(a), patch


def test_digest_of_the_start_aggregate_rule():
    """The rank rule changes what realdgen writes, so its datasets get a new digest; `distance` (the
    rule before the field) keeps the digests of datasets written before it; baselines ignore it."""
    gen = {"kind": "realdgen", "checkpoint": "c.safetensors"}
    digest = lambda g: manifest_digest(parse_manifest({**BASE, "generator": g}))  # noqa: E731
    assert digest(gen) == digest({**gen, "start_aggregate": "rank"})
    assert digest(gen) != digest({**gen, "start_aggregate": "distance"})
    payload = parse_manifest({**BASE, "generator": gen}).model_dump(mode="json")
    assert payload["generator"]["start_aggregate"] == "rank"  # popped by the digest only, not by the schema
    assert digest({"kind": "bicubic"}) == digest({"kind": "bicubic", "start_aggregate": "distance"})
    with pytest.raises(ManifestError, match="start_aggregate"):
        parse_manifest({**BASE, "generator": {**gen, "start_aggregate": "median"}})


def test_schema_has_descriptions():
    schema = manifest_json_schema("generate")
    text = json.dumps(schema)
    assert "additionalProperties" in text and "Tile edge in LR pixels" in text
    tiling = schema["$defs"]["TilingSpec"]["properties"]["tile"]
    assert tiling["minimum"] == 8 and tiling["description"]


def test_digest_of_the_probe_layout():
    """`spread` (the default) changes which tiles the start choice reads, so its datasets get a new
    digest (and another when its shortfall began to be made up); `centre` (the layout before the
    field) keeps the old ones; baselines ignore it."""
    gen = {"kind": "realdgen", "checkpoint": "c.safetensors"}
    digest = lambda g: manifest_digest(parse_manifest({**BASE, "generator": g}))  # noqa: E731
    assert parse_manifest({**BASE, "generator": gen}).generator.start_probe_layout == "spread"
    assert digest(gen) == digest({**gen, "start_probe_layout": "spread"})
    assert digest(gen) != digest({**gen, "start_probe_layout": "centre"})
    # centre keeps its digest; spread's moved when its shortfall began to be made up from the
    # earlier inputs (the old value was computed with the code before that change)
    assert digest({**gen, "start_probe_layout": "centre"}).startswith("6b7daf5cb613d6d4")
    assert not digest(gen).startswith("b26d27aaea95bcd6")
    assert digest({"kind": "bicubic"}) == digest({"kind": "bicubic", "start_probe_layout": "centre"})
    with pytest.raises(ManifestError, match="start_probe_layout"):
        parse_manifest({**BASE, "generator": {**gen, "start_probe_layout": "grid"}})


def test_digest_marks_the_tau_zero_rule():
    """τ = 0 became "no diffusion": a realdgen dataset whose τ range holds 0 is made differently
    since, so its digest moved (never resumed into an older one's shards); τ ≥ 1 ranges and the
    baselines keep theirs. The old digests were computed with the code before the change."""
    digest = lambda t: manifest_digest(  # noqa: E731
        parse_manifest(
            {
                **BASE,
                "generator": {
                    "kind": "realdgen",
                    "checkpoint": "c.safetensors",
                    "tau_min": t[0],
                    "tau_max": t[1],
                    "start_probe_layout": "centre",  # spread's digest moved again later (probe fill)
                },
            }
        )
    )
    assert digest((0, 5)) != "40e8154ae710d1ffe0dc71334cdafcc7d3fa5afb194100038a1bc066ccb11cf1"  # before
    assert digest((1, 5)) == "ab1290f99d7b83e225fa9f262f9e278e0ad54aa0531ea16daa74972e6f0f196b"  # unchanged
    assert digest((0, 5)) != digest((1, 5))


def test_evaluate_sr_proxy_photos_are_known_demo_photos():
    """A typo in sr_proxy.photos is a manifest error naming the key, not a traceback from
    pipelines/demo_data.py once the evaluation has started."""
    data = {
        "kind": "evaluate",
        "root": "bench",
        "domains": [{"name": "d"}],
        "generation": {"generators": ["bicubic"]},
        "report": {"dir": "out"},
    }
    assert parse_manifest({**data, "sr_proxy": {"photos": ["camera", "motorcycle_left"]}})
    with pytest.raises(ManifestError, match=r"sr_proxy.photos: unknown photo\(s\) \['camra'\]; the bundled"):
        parse_manifest({**data, "sr_proxy": {"photos": ["camera", "camra"]}})
    with pytest.raises(ManifestError, match=r"sr_proxy.photos: unknown photo\(s\) \['download_all'\]"):
        parse_manifest(apply_overrides(data, ["sr_proxy.photos=[download_all]"]))  # skimage.data, not a photo
    # the default list and the demo splits are all known; load_photo refuses the others
    from pipelines.demo_data import PHOTOS, SPLITS, load_photo
    from pipelines.manifest import EvalSRProxy

    assert set(EvalSRProxy().photos) <= set(PHOTOS) and {n for s in SPLITS.values() for n in s} <= set(PHOTOS)
    with pytest.raises(ValueError, match="unknown demo photo 'download_all'"):
        load_photo("download_all")


def test_digest_marks_the_bsrgan_resize_clip():
    """BSRGAN θs clip to [0, 1] after each resize since 2026-12-07: datasets drawn by the bsrgan
    baseline (or realdgen from bsrgan starts) get a new digest and are never resumed into older
    shards; other generators keep theirs. The old digests were computed with the code before."""
    digest = lambda g: manifest_digest(parse_manifest({**BASE, "generator": g}))  # noqa: E731
    assert digest({"kind": "bsrgan"}) != "84050f60cef1759869222e8955da1bd45c2aad340679fb53737fb49e4a19445c"
    unchanged = "a371331228b87406444130294e511b158e88af566aa50b43190cbd4ccac14120"
    assert digest({"kind": "realesrgan"}) == unchanged
    rd = {"kind": "realdgen", "checkpoint": "c.safetensors", "tau_min": 1, "tau_max": 5}
    rd |= {"start_kind": "bsrgan", "start_probe_layout": "centre"}
    assert digest(rd) != "d9e4887adb0d144b4dadbc4c34601d12ede49fdd60ac44aeb83c8cf50fec2c05"
    # realdgen from Real-ESRGAN starts draws no BSRGAN θ: its digest is the one from before
    kept = "3217df38574ef9a6a312515c3a1a08309605581c6fcdac8a1aa4062861a2d38c"
    assert digest({**rd, "start_kind": "realesrgan"}) == kept


def test_payload_changes_name_the_keys_that_differ():
    from pipelines.manifest import payload_changes

    a = {"seed": 7, "generator": {"k": 2, "kind": "realdgen", "start_bank": [{"q": 1}] * 9}, "x": 1}
    b = {"seed": 7, "generator": {"k": 3, "kind": "realdgen", "start_bank": [{"q": 2}] * 9}, "y": 1}
    assert payload_changes(a, a) == []
    got = payload_changes(a, b)
    assert got[0] == "generator.k: 2 → 3"
    assert got[1].startswith('generator.start_bank: [{"q": 1}, {"q": 1}') and got[1].endswith("...")
    assert got[2] == "x: 1 → (unset)"
    assert got[3] == "1 more" and len(got) == 4
    assert payload_changes(a, b, limit=5)[-1] == "y: (unset) → 1"
