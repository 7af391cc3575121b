"""Checkpoints: bit-exact round trip, stable digest, pickles refused unopened, named tensor errors."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from realdgen_core.checkpoint import CheckpointError, checkpoint_digest, load_checkpoint, save_checkpoint
from realdgen_core.config import RealDGenConfig, preset
from realdgen_core.models import COMPONENTS, build_model


@pytest.fixture(scope="module")
def model():
    return build_model(preset("tiny", 4), seed=7).eval()


@pytest.fixture()
def saved(tmp_path: Path, model) -> tuple[Path, str]:
    path = tmp_path / "ckpt" / "model.safetensors"
    digest = save_checkpoint(path, model, {"stage": "C", "epoch": 3})
    return path, digest


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def test_round_trip_bit_exact(saved, model) -> None:
    path, digest = saved
    loaded, meta = load_checkpoint(path)
    assert meta == {"stage": "C", "epoch": 3, "digest": digest}
    assert loaded.config == model.config and not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 32, 32, generator=g)
    lr = torch.rand(2, 3, 8, 8, generator=g)
    x_t = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([5, 250])
    with torch.no_grad():
        c1, c2 = model.condition(hr, lr), loaded.condition(hr, lr)
        assert torch.equal(c1, c2)
        assert torch.equal(model.unet(x_t, c1, t), loaded.unet(x_t, c2, t))
        assert torch.equal(model.content(hr)[0], loaded.content(hr)[0])
        assert torch.equal(model.reconstruct_lr(hr, lr), loaded.reconstruct_lr(hr, lr))
    # Loaded parameters are ordinary trainable parameters (stage C fine-tunes from a checkpoint).
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())


def test_file_layout(saved, model) -> None:
    path, _ = saved
    header = _header(path)
    meta = header.pop("__metadata__")
    assert meta["format_version"] == "1"
    assert RealDGenConfig.from_dict(json.loads(meta["config"])) == model.config
    assert json.loads(meta["metadata"]) == {"stage": "C", "epoch": 3}
    assert set(header) == set(model.state_dict())
    assert {name.split(".", 1)[0] for name in header} == set(COMPONENTS)
    assert not list(path.parent.glob(".*tmp*"))  # the temporary file was renamed away


def test_digest_stable_and_sensitive(tmp_path: Path, saved, model) -> None:
    path, digest = saved
    assert checkpoint_digest(path) == digest and len(digest) == 64
    # Stable across load and re-save, whatever the user metadata.
    loaded, _ = load_checkpoint(path)
    assert save_checkpoint(tmp_path / "again.safetensors", loaded, {"other": True}) == digest
    assert save_checkpoint(str(tmp_path / "str_path.safetensors"), model) == digest
    # One weight changed by one ulp => another digest.
    with torch.no_grad():
        w = loaded.degradation.last_conv.weight
        w[0, 0, 0, 0] = torch.nextafter(w[0, 0, 0, 0], torch.tensor(float("inf")))
    assert save_checkpoint(tmp_path / "changed.safetensors", loaded) != digest
    # Another config with the same tensors is another model.
    other = build_model(preset("tiny", 2), seed=7)
    assert save_checkpoint(tmp_path / "x2.safetensors", other) != digest


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): the marker file exists iff something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_pickle_refused_without_unpickling(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / "evil.pt"
    payload = {"unet.conv_in.weight": torch.zeros(1), "x": _WritesMarker(marker)}
    if kind == "torch_zip":
        torch.save(payload, path)
    elif kind == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    assert not marker.exists()
    # Sanity: the file really is dangerous (proves the marker mechanism works).
    if kind == "raw_pickle":
        probe = tmp_path / "probe.pkl"
        probe.write_bytes(pickle.dumps(_WritesMarker(tmp_path / "probe.marker")))
        pickle.loads(probe.read_bytes())
        assert (tmp_path / "probe.marker").exists()
    for fn in (load_checkpoint, checkpoint_digest):
        with pytest.raises(CheckpointError, match="not a safetensors file.*(not be unpickled|pickle)"):
            fn(path)
    assert not marker.exists()


def test_header_length_with_pickle_byte_still_loads(tmp_path: Path, model) -> None:
    """A safetensors header length whose low byte is 0x80 makes the file start with the pickle
    PROTO byte; the loader must decide by structure, not by that first byte (regression)."""
    path = tmp_path / "m.safetensors"
    for pad in range(64):  # header lengths step by 8 bytes: 32 steps cover every low byte
        save_checkpoint(path, model, metadata={"pad": "." * 8 * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("could not produce a header length with low byte 0x80")
    loaded, meta = load_checkpoint(path)
    assert meta["pad"] == "." * 8 * pad
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    plain = tmp_path / "plain.safetensors"  # a safetensors file that is not ours
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="config"):
        load_checkpoint(plain)


def test_a_checkpoint_cut_short_says_truncated(tmp_path: Path, saved) -> None:
    data = saved[0].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"truncated: {len(data) // 2} of the {len(data)} bytes"):
        checkpoint_digest(cut)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut)


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Re-save src's tensors after edit(tensors) with the same metadata."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)


def test_missing_tensor_named(tmp_path: Path, saved) -> None:
    path, _ = saved
    bad = tmp_path / "missing.safetensors"
    _rewrite(path, bad, lambda t: t.pop("unet.conv_out.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'unet\.conv_out\.bias'"):
        load_checkpoint(bad)


def test_unexpected_tensor_named(tmp_path: Path, saved) -> None:
    path, _ = saved
    bad = tmp_path / "extra.safetensors"
    _rewrite(path, bad, lambda t: t.update({"unet.extra_head.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'unet\.extra_head\.weight'"):
        load_checkpoint(bad)


def test_shape_mismatch_named(tmp_path: Path, saved) -> None:
    path, _ = saved
    bad = tmp_path / "shape.safetensors"
    _rewrite(path, bad, lambda t: t.update({"degradation.mapping.3.weight": torch.zeros(2048, 8, 1, 1)}))
    with pytest.raises(
        CheckpointError, match=r"'degradation\.mapping\.3\.weight' has shape \(2048, 8, 1, 1\)"
    ):
        load_checkpoint(bad)


def test_config_not_matching_tensors(tmp_path: Path, saved) -> None:
    """A config edited to other widths no longer matches the stored tensors: the first mismatch is named."""
    path, _ = saved
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    cfg["unet"]["base_channels"] = 16
    meta["config"] = json.dumps(cfg)
    bad = tmp_path / "cfg.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match=r"tensor 'unet\.[^']+'"):
        load_checkpoint(bad)
    cfg["unet"]["mystery"] = 1
    meta["config"] = json.dumps(cfg)
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="mystery"):
        load_checkpoint(bad)


def test_metadata_validation(tmp_path: Path, model) -> None:
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "b.safetensors", model, {"obj": object()})
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_loaded_metadata_saves_again_as_it_is(tmp_path: Path, model) -> None:
    """load → save with the metadata load returned (its computed ``digest`` included) used to be
    refused as a reserved key; the digest is left out and computed again at load."""
    first = save_checkpoint(tmp_path / "a.safetensors", model, {"calibration": {"tau_max": 0}})
    loaded, meta = load_checkpoint(tmp_path / "a.safetensors")
    assert meta["digest"] == first
    again = save_checkpoint(tmp_path / "b.safetensors", loaded, meta)
    assert again == first
    _, meta_b = load_checkpoint(tmp_path / "b.safetensors")
    assert meta_b == meta  # the calibration kept, the digest computed, not stored
    assert save_checkpoint(tmp_path / "c.safetensors", model, {"digest": "not this"}) == first
    assert load_checkpoint(tmp_path / "c.safetensors")[1] == {"digest": first}


def _with_header(src: Path, dst: Path, edit) -> Path:
    """src with its JSON header replaced by edit(header) (same data section)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    new = edit(header)
    blob = new if isinstance(new, bytes) else json.dumps(new).encode()
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    return dst


@pytest.mark.parametrize(
    "case,edit,message",
    [
        ("metadata a string", lambda h: {**h, "__metadata__": "config"}, "__metadata__ must map names"),
        (
            "config an object",
            lambda h: {**h, "__metadata__": {**h["__metadata__"], "config": {}}},
            "map names",
        ),
        (
            "user metadata a list",
            lambda h: {**h, "__metadata__": {**h["__metadata__"], "metadata": "[1, 2]"}},
            "'metadata' entry is not a JSON object",
        ),
        (
            "float offsets",
            lambda h: {
                **h,
                **{k: {**v, "data_offsets": [0.0, 4.5]} for k, v in h.items() if k != "__metadata__"},
            },
            "corrupt safetensors header entry",
        ),
        ("deep json", lambda h: b"{" + b'"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested too deeply"),
    ],
)
def test_a_malformed_header_is_a_checkpoint_error(tmp_path: Path, saved, case, edit, message) -> None:
    """Any header a hostile or broken file can hold ends in a CheckpointError naming the file (the
    callers turn it into one line), never in an AttributeError/TypeError/RecursionError traceback."""
    from realdgen_core.checkpoint import inspect_checkpoint

    bad = _with_header(saved[0], tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match=message) as info:
        inspect_checkpoint(bad)
    assert str(bad) in str(info.value)


def test_a_changed_byte_in_the_tensors_is_reported_as_corrupt(tmp_path: Path, saved) -> None:
    """The digest identified the model but nothing checked it: a checkpoint with a flipped byte in a
    tensor (a bad copy, a partial download into a cache) loaded as a different model, silently. The
    digest computed when the file is written is stored in it; a load or inspection that reads other
    bytes is refused, naming both digests. Metadata edits keep it valid, and files written before the
    digest was stored (the committed demo checkpoint among them) load as before."""
    from safetensors import safe_open

    from realdgen_core.checkpoint import STORED_DIGEST_KEY, inspect_checkpoint

    path, digest = saved
    assert _header(path)["__metadata__"][STORED_DIGEST_KEY] == digest
    raw = bytearray(path.read_bytes())
    header = _header(path)
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    begin, end = header["unet.conv_out.weight"]["data_offsets"]
    raw[start + (begin + end) // 2] ^= 0x10
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    now = checkpoint_digest(bad)
    assert now != digest
    said = rf"corrupt: .* {now[:12]}…, not the {digest[:12]}… recorded"
    for read in (load_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=said):
            read(bad)
    # a metadata-only edit (what a calibration records) keeps the stored digest valid
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata={**meta, "metadata": json.dumps({"note": "calibrated"})})
    assert load_checkpoint(edited)[1] == {"note": "calibrated", "digest": digest}
    # written before the digest was stored: no check, the same digest
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={k: v for k, v in meta.items() if k != STORED_DIGEST_KEY})
    assert load_checkpoint(old)[1]["digest"] == digest
    old_flipped = tmp_path / "old_flipped.safetensors"
    raw_old = bytearray(old.read_bytes())
    raw_old[-5] ^= 0x10
    old_flipped.write_bytes(bytes(raw_old))
    assert load_checkpoint(old_flipped)[1]["digest"] not in (digest, None)
