"""Domain adaptation in one command: stage C (and optionally all of E_deg) fine-tuned from a checkpoint
on a folder of LR images; everything else stays as it was in the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from realdgen_core.checkpoint import load_checkpoint, save_checkpoint
from realdgen_core.config import preset
from realdgen_core.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_adapt_stage_c_from_checkpoint_on_lr_folder(tmp_path, photos):
    from pipelines import train as T

    base = tmp_path / "base.safetensors"
    save_checkpoint(base, build_model(preset("tiny", 4), seed=7))
    lr_dir = tmp_path / "my_camera"
    lr_dir.mkdir()
    for name, img in photos.items():  # "real LR": small photos of the user's domain
        Image.fromarray(img[::4, ::4][:64, :64]).save(lr_dir / f"{name}.jpg", quality=40)
    (lr_dir / "notes.txt").write_text("not an image, not listed")

    path = tmp_path / "adapt.yaml"
    path.write_text(
        f"""
kind: train
init_checkpoint: {base}
stages: [C]
data:
  lr: [{{kind: images, source: {{uri: {lr_dir}}}}}]
stage_c: {{steps: 3, batch_size: 2, lr_crop: 16, degradation_trainable: all, finetune_lr: 1.0e-4}}
output: {{run_dir: {tmp_path / "run"}, checkpoint: {tmp_path / "adapted.safetensors"}}}
compute: {{torch_threads: 1}}
progress: {{bar: false}}
"""
    )
    assert T.main([str(path)]) == 0
    # trained with the calibration off: a later --calibrate-only of this manifest is warned that its
    # validation split was read by stage C (not held out); a run folder of another manifest is not
    from pipelines.manifest import load_manifest

    trained = load_manifest(path, kind="train")
    warning = T._held_out_warning(trained)
    assert warning and "read every file of data.lr, the validation split included" in warning
    assert str(tmp_path / "run") in warning
    assert T._held_out_warning(load_manifest(path, ["seed=3"], kind="train")) is None
    assert (
        T._held_out_warning(load_manifest(path, ["output.run_dir=" + str(tmp_path / "none")], kind="train"))
        is None
    )
    assert not (tmp_path / "none").exists()  # looking did not create it

    before, _ = load_checkpoint(base)
    after, meta = load_checkpoint(tmp_path / "adapted.safetensors")
    assert meta["completed"] == ["diffusion"]
    # the architecture came from the base checkpoint: recorded as such, not as the manifest's preset
    assert meta["init_checkpoint"] == str(base) and "preset" not in meta
    b, a = before.state_dict(), after.state_dict()
    changed = {k for k in b if not torch.equal(b[k], a[k])}
    assert any(k.startswith("unet.") for k in changed)
    assert any(k.startswith("modulation.") for k in changed)
    assert any(k.startswith("degradation.blocks.") for k in changed)  # all of E_deg, as asked
    assert any(k.startswith("content.encoder.first_block.") for k in changed)
    frozen = [k for k in b if k.startswith(("content.decoder.", "content.encoder.mid.", "lr_reconstructor."))]
    assert frozen and not (changed & set(frozen))

    # the adapt manifest's default keeps E_deg as it is (the start choice and the filter measure with it)
    import yaml

    repo_adapt = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "manifests" / "adapt.yaml").read_text()
    )
    assert repo_adapt["stage_c"]["degradation_trainable"] == "none"
    path.write_text(
        path.read_text()
        .replace("degradation_trainable: all", "degradation_trainable: none")
        .replace(str(tmp_path / "run"), str(tmp_path / "run_none"))
        .replace(str(tmp_path / "adapted.safetensors"), str(tmp_path / "adapted_none.safetensors"))
    )
    assert T.main([str(path)]) == 0
    kept, _ = load_checkpoint(tmp_path / "adapted_none.safetensors")
    k = kept.state_dict()
    moved = {n for n in b if not torch.equal(b[n], k[n])}
    assert any(n.startswith("unet.") for n in moved)
    assert not any(n.startswith("degradation.") for n in moved)


def test_adapt_on_a_missing_or_empty_lr_folder_fails_before_any_work(tmp_path, capsys):
    """The README's adaptation with no usable LR folder: exit 2 and the manifest key named, before the
    checkpoint is read or anything is written (before, a worker's SourceError traceback, exit 1)."""
    from pipelines import train as T

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no image here")
    run_dir, out = tmp_path / "run", tmp_path / "adapted.safetensors"
    path = tmp_path / "adapt.yaml"

    def write(uri, extra: str = "") -> None:
        path.write_text(
            f"""
kind: train
init_checkpoint: {tmp_path / "absent.safetensors"}
stages: [C]
data:
  lr: [{{kind: images, source: {{uri: {uri}}}}}]
output: {{run_dir: {run_dir}, checkpoint: {out}}}
{extra}"""
        )

    for uri, needle in (
        (tmp_path / "nowhere", "data.lr.0.source: cannot list"),
        (empty, "data.lr.0.source: no image under"),
    ):
        write(uri)
        for extra in ([], ["--calibrate-only"]):
            assert T.main([str(path), *extra]) == 2
            err = capsys.readouterr().err
            assert needle in err and str(uri) in err, err
    assert not run_dir.exists() and not out.exists()
    # compute.device belongs to the local backend: a Ray run with `device: cuda` is not refused on a
    # driver without a GPU (it was, with "torch sees no CUDA GPU here"); it gets to the source check
    write(tmp_path / "nowhere", "compute: {backend: ray, device: cuda, use_gpu: true}\n")
    assert T.main([str(path)]) == 2
    assert "data.lr.0.source: cannot list" in capsys.readouterr().err

    # one image, calibration on: one side of the split is empty; said before any training (it was
    # found after stage C had run and exported, as "the source lists no images")
    from realdgen_core.calibrate import split_validation

    one = tmp_path / "one"
    one.mkdir()
    name = next(f"p{i}.png" for i in range(100) if split_validation([f"p{i}.png"], 0.25)[0])
    Image.new("RGB", (96, 96)).save(one / name)
    write(one, "calibration: {enabled: true, val_fraction: 0.25}\n")
    assert T.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.lr.0.source: the calibration's validation split" in err and "1 image(s)" in err, err
    assert not run_dir.exists() and not out.exists()


def test_adapt_errors_found_before_or_during_the_run_are_one_line_and_nothing_is_trained(tmp_path, capsys):
    """A user's mistakes, each one `error:` line with exit 2 (they were tracebacks, exit 1, some after
    training had run): an output checkpoint that is a folder or lies under a file (found at the first
    export, the training lost), a validation split whose every file is broken (found after stage C),
    a truncated init_checkpoint, and a source whose every image is smaller than the crop."""
    from pipelines import train as T
    from realdgen_core.calibrate import split_validation

    lr = tmp_path / "lr"
    lr.mkdir()
    names = [f"p{i}.png" for i in range(6)]
    val = set(split_validation(names, 0.25)[1])
    assert val and len(val) < len(names)
    for i, n in enumerate(names):
        if i in val:
            (lr / n).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
        else:
            Image.new("RGB", (96, 96), (i * 30, 90, 120)).save(lr / n)
    run_dir = tmp_path / "run"
    path = tmp_path / "adapt.yaml"
    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "realdgen-small-x4.safetensors"

    def run(out, *extra, init=ckpt, source=lr, calibration="{enabled: false}"):
        path.write_text(
            f"kind: train\ninit_checkpoint: {init}\nstages: [C]\n"
            f"data:\n  lr: [{{kind: images, source: {{uri: {source}}}}}]\n"
            f"stage_c: {{steps: 1, batch_size: 1, lr_crop: 32}}\n"
            f"calibration: {calibration}\n"
            f"output: {{run_dir: {run_dir}, checkpoint: {out}}}\n"
        )
        rc = T.main([str(path), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, (rc, err[-2000:])
        return err

    folder = tmp_path / "a_folder"
    folder.mkdir()
    err = run(folder)
    assert "output.checkpoint: " in err and "is a folder" in err, err
    assert "lies under" in run(lr / names[0] / "out.safetensors")
    assert not run_dir.exists()

    out = tmp_path / "adapted.safetensors"
    err = run(out, calibration="{enabled: true, val_fraction: 0.25}")
    assert f"none of the {len(val)} image(s) of the calibration's validation split" in err, err
    assert "calibration.enabled=false" in err
    err = run(out, "--calibrate-only", calibration="{enabled: true, val_fraction: 0.25}")
    assert "validation split" in err and "calibration.enabled=false" not in err  # no effect there
    assert not run_dir.exists()

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(ckpt.read_bytes()[:200_000])  # past the header, inside the tensors
    err = run(out, init=cut)
    assert err.startswith("error: init_checkpoint: ") and "truncated" in err, err
    # the checkpoint's scale wins over the manifest's: crops are checked against it (x4 here)
    err = run(out, "--set", "scale=2", "--set", "stage_a.hr_crop=34")
    assert (
        "init_checkpoint is a x4 model (it wins over scale 2): stage_a.hr_crop 34 is not a multiple" in err
    ), err

    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20)).save(small / f"s{i}.png")
    err = run(out, source=small)
    assert "data.lr.0.source: no usable image of at least 32x32 px" in err, err
    assert "(0 broken, 3 smaller, of 3;" in err, err
    assert not out.exists()

    # a calibration τ grid past the model's trained timesteps (500): before stage C, not after it
    good = tmp_path / "good"
    good.mkdir()
    for i in range(6):
        Image.new("RGB", (96, 96), (i * 30, 90, 120)).save(good / f"g{i}.png")
    grid = "{enabled: true, val_fraction: 0.25, tau_grid: [0, 300, 500]}"
    for extra, model in (((), out), (("--calibrate-only",), tmp_path / "copy.safetensors")):
        if extra:
            model.write_bytes(ckpt.read_bytes())  # --calibrate-only calibrates output.checkpoint's model
        err = run(model, *extra, source=good, calibration=grid)
        assert "calibration.tau_grid: [500] at or past the model's max_train_timestep (500)" in err, err
    assert not out.exists()
