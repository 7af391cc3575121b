"""Checkpoints: one safetensors file holding every tensor of a RealDGenModel plus its config as plain JSON.

Format (``format_version`` 1):

- tensors named ``<component>.<param>`` (``content.encoder.conv_out.weight``, ``unet.conv_in.bias``,
  ...): exactly ``RealDGenModel.state_dict()``;
- safetensors ``__metadata__`` (string -> string): ``format_version``, ``config`` (canonical JSON of
  ``RealDGenConfig.to_dict()``) and ``metadata`` (JSON of the caller's metadata dict).

Loading never unpickles: the header is checked first, so a ``torch.save`` file (zip or raw pickle)
is refused before any of it is interpreted. The digest identifies the model, not the file: sha256
over the canonical config JSON and, for every tensor in name order, its name, dtype, shape and raw
bytes. User metadata is not part of it, so re-saving a loaded model with other metadata keeps it.
The digest of what was written is stored in the metadata (``digest``); a load or inspection that
reads another is refused as corrupt (files written before it was stored are read unchecked).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from realdgen_core.config import RealDGenConfig
from realdgen_core.models import RealDGenModel

FORMAT_VERSION = "1"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_SAFETENSORS_DTYPES = {v: k for k, v in _FLOAT_DTYPES.items()}
_RESERVED_METADATA_KEYS = ("digest",)
# safetensors metadata key of the digest computed when the file was written (since 2026-12-08;
# files written before carry none and are loaded unchecked)
STORED_DIGEST_KEY = "digest"


class CheckpointError(ValueError):
    """Unloadable checkpoint: not safetensors (e.g. a pickle), bad config, or tensors not matching it."""


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _read_header(path: Path) -> tuple[dict, int]:
    """(safetensors header, offset of the data section); refuses anything else without parsing it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:4] == b"PK\x03\x04":
                raise CheckpointError(
                    f"{path}: not a safetensors file (it is a zip archive, e.g. a torch.save checkpoint); "
                    "it will not be unpickled. Convert it with save_checkpoint() in a trusted environment."
                )
            # A pickle starts with the PROTO opcode 0x80, but so does a safetensors file whose
            # header length has 0x80 as its low byte: decide by the structure, name the pickle
            # only in the message.
            hint = " (it starts like a Python pickle); will not be unpickled" if head[:1] == b"\x80" else ""
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes){hint}")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: not a safetensors file (header length {n} invalid for {size} bytes){hint}"
                )
            raw = f.read(n)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: checkpoint not found") from e
    if raw[:1] != b"{":
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object){hint}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not valid JSON: {e})") from e
    except RecursionError:
        raise CheckpointError(f"{path}: not a safetensors file (header JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map names to strings")
    data_len = size - 8 - n
    wanted = 0  # where the last tensor ends; a malformed entry is named below
    with contextlib.suppress(TypeError, KeyError, ValueError, IndexError):
        wanted = max(int(info["data_offsets"][1]) for k, info in header.items() if k != "__metadata__")
    if wanted > data_len:  # a header that is whole but data cut short: a partial copy or download
        raise CheckpointError(
            f"{path}: truncated: {size} of the {8 + n + wanted} bytes its header describes "
            "(an interrupted copy or download?)"
        )
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            ok = (
                all(type(x) is int for x in (begin, end))
                and 0 <= begin <= end <= data_len
                and isinstance(info["dtype"], str)
                and isinstance(info["shape"], list)
                and all(type(x) is int and x >= 0 for x in info["shape"])
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}")
    return header, 8 + n


def _digest(path: Path, header: dict, data_start: int) -> str:
    meta = header.get("__metadata__") or {}
    if "config" not in meta:
        raise CheckpointError(f"{path}: no 'config' in the safetensors metadata (not a RealDGen checkpoint)")
    try:
        config_json = _canonical_json(json.loads(meta["config"]))
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise CheckpointError(f"{path}: the 'config' metadata is not valid JSON: {e!r}") from None
    names = sorted(k for k in header if k != "__metadata__")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else memoryview(b"") as buf:
            return _digest_of(
                config_json,
                (
                    (name, header[name]["dtype"], header[name]["shape"], buf[data_start + b : data_start + e])
                    for name in names
                    for b, e in [header[name]["data_offsets"]]
                ),
            )


def _digest_of(config_json: str, tensors) -> str:
    """The digest of a canonical config JSON and ``(name, safetensors dtype, shape, raw bytes)`` in
    name order: what :func:`_digest` reads from a file, and :func:`save_checkpoint` from memory."""
    h = hashlib.sha256()
    h.update(b"realdgen-checkpoint\nconfig\n")
    h.update(config_json.encode())
    for name, dtype, shape, data in tensors:
        h.update(b"\ntensor\n")
        h.update(_canonical_json([name, dtype, list(shape), len(data)]).encode())
        h.update(b"\n")
        h.update(data)
    return h.hexdigest()


def _raw(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes as safetensors writes them (little-endian, as in memory here)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def checkpoint_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) over the config and the tensors of a checkpoint file; independent of user metadata."""
    path = Path(path)
    header, data_start = _read_header(path)
    return _digest(path, header, data_start)


def save_checkpoint(path: str | os.PathLike, model: RealDGenModel, metadata: dict | None = None) -> str:
    """Write ``model`` (config + tensors) and JSON-serialisable ``metadata`` atomically; return the digest.

    The file is written next to its destination under a temporary name, fsynced and renamed, so a
    reader never sees a half-written checkpoint. The user metadata's ``digest`` is computed at load:
    the metadata :func:`load_checkpoint` returned can be saved again as it is (its ``digest`` is left
    out); the digest of the bytes written is stored beside it, in the safetensors metadata.
    """
    path = Path(path)
    metadata = {k: v for k, v in (metadata or {}).items() if k not in _RESERVED_METADATA_KEYS}
    try:
        metadata_json = _canonical_json(metadata)
    except TypeError as e:
        raise CheckpointError(f"metadata is not JSON-serialisable: {e}") from e
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    config_json = _canonical_json(model.config.to_dict())
    # the digest of what is written, stored beside it: a load that reads other bytes says the file is corrupt
    expected = _digest_of(
        config_json,
        (
            (name, _SAFETENSORS_DTYPES[tensors[name].dtype], tensors[name].shape, _raw(tensors[name]))
            for name in sorted(tensors)
        ),
    )
    st_meta = {
        "format_version": FORMAT_VERSION,
        "config": config_json,
        "metadata": metadata_json,
        STORED_DIGEST_KEY: expected,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=st_meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        header, data_start = _read_header(tmp)
        digest = _digest(tmp, header, data_start)
        if digest != expected:
            raise CheckpointError(f"{path}: the file written does not read back as the model saved; not kept")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest


def inspect_checkpoint(path: str | os.PathLike) -> tuple[RealDGenConfig, dict, dict]:
    """(config, metadata with ``digest``, the raw safetensors metadata) of a checkpoint, checked as
    :func:`load_checkpoint` checks it (header, format version, config, every tensor's name, shape
    and dtype against the config) without reading its tensors. Raises CheckpointError."""
    config, user_metadata, meta, _ = _inspect(Path(path))
    return config, user_metadata, meta


def _inspect(path: Path) -> tuple[RealDGenConfig, dict, dict, RealDGenModel]:
    """:func:`inspect_checkpoint` plus the model built on the meta device (no allocation, no
    init), whose state the tensors were checked against and into which they can be assigned."""
    header, data_start = _read_header(path)
    meta = header.get("__metadata__") or {}
    if "config" not in meta:
        raise CheckpointError(f"{path}: no 'config' in the safetensors metadata (not a RealDGen checkpoint)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported format_version {version!r} (this code reads {FORMAT_VERSION!r})"
        )
    digest = _digest(path, header, data_start)
    stored_digest = meta.get(STORED_DIGEST_KEY)
    try:
        config = RealDGenConfig.from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: invalid model config: {e}") from e
    try:
        user_metadata = json.loads(meta.get("metadata", "{}"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: the 'metadata' entry is not valid JSON: {e!r}") from None
    if not isinstance(user_metadata, dict):
        raise CheckpointError(f"{path}: the 'metadata' entry is not a JSON object")
    with torch.device("meta"):
        model = RealDGenModel(config)
    _check_tensors(path, model.state_dict(), {k: v for k, v in header.items() if k != "__metadata__"})
    if stored_digest is not None and stored_digest != digest:
        raise CheckpointError(
            f"{path}: corrupt: its config and tensors read as digest {digest[:12]}…, not the "
            f"{str(stored_digest)[:12]}… recorded when it was saved (a changed byte, or a copy that went "
            "wrong); copy, download or train it again. A file whose tensors were rewritten by another "
            "tool with this metadata copied (e.g. converted to fp16) carries the old digest: save it "
            "with realdgen_core.checkpoint.save_checkpoint, or drop the 'digest' metadata key"
        )
    user_metadata["digest"] = digest
    return config, user_metadata, meta, model


def _check_tensors(path: Path, expected: dict[str, torch.Tensor], stored: dict) -> None:
    """CheckpointError naming the first missing / unexpected / mis-shaped / non-float tensor."""
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    for name, ref in expected.items():
        info = stored[name]
        if list(ref.shape) != info["shape"]:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(info['shape'])}, "
                f"the config expects {tuple(ref.shape)}"
            )
        if info["dtype"] not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {info['dtype']}, expected a float dtype"
            )


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[RealDGenModel, dict]:
    """(model in eval mode on ``device``, metadata) where metadata is the saved dict plus ``digest``.

    Raises CheckpointError for a file that is not safetensors (nothing is unpickled), an unknown
    format version, a config that does not parse, or tensors that do not match the config (the
    message names the missing / unexpected / mis-shaped tensor).
    """
    path = Path(path)
    _, user_metadata, _, model = _inspect(path)  # the loaded tensors are assigned into it
    expected = model.state_dict()
    tensors = load_file(str(path), device="cpu")
    state = {name: t.to(expected[name].dtype) for name, t in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device).eval()
    return model, user_metadata
