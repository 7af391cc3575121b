"""Kill-and-resume: a phase restored from its checkpoint continues at the saved step with the saved
optimiser/EMA/RNG state, and ends exactly where an uninterrupted run ends; the same through
``pipelines/train.py`` (run folder, latest.json, CSV logs, broken images skipped and counted)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from PIL import Image

from realdgen_core.config import preset
from realdgen_core.models import build_model
from realdgen_core.train import (
    ArrayCropSampler,
    DiffusionStageConfig,
    DiffusionTrain,
    Hook,
    SyntheticLRSampler,
    load_training_state,
    run_phase,
    save_training_state,
)


class Killed(RuntimeError):
    pass


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _assert_same_tree(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def test_phase_kill_and_resume_is_exact(tmp_path, photos):
    hr = ArrayCropSampler(list(photos.values()))
    lr = SyntheticLRSampler(hr, ("realesrgan", "bsrgan"), 4)
    cfg = DiffusionStageConfig(steps=8, batch_size=2, lr_crop=16, lr=1e-3)

    reference = build_model(preset("tiny", 4), seed=0)
    run_phase(DiffusionTrain(reference, cfg, lr, seed=3))

    model = build_model(preset("tiny", 4), seed=0)
    phase = DiffusionTrain(model, cfg, lr, seed=3)
    saved: dict = {}

    class SaveThenKill(Hook):
        def on_step(self, ph, losses):
            if ph.step == 4:
                save_training_state(tmp_path / "ckpt", model, ph.state_dict())
                saved.update(copy.deepcopy(ph.state_dict()))
            if ph.step == 6:  # progress after the checkpoint is lost, as in a real kill
                raise Killed

    with pytest.raises(Killed):
        run_phase(phase, [SaveThenKill()])
    assert saved["optimizer"]["state"], "the optimiser had state to save"

    resumed_model = build_model(preset("tiny", 4), seed=123)  # other init: all must come from disk
    state = load_training_state(tmp_path / "ckpt", resumed_model)
    resumed = DiffusionTrain(resumed_model, cfg, lr, seed=3)
    resumed.load_state_dict(state)
    assert resumed.step == 4
    _assert_same_tree(saved["optimizer"], resumed.optimizer.state_dict(), "optimizer")
    _assert_same_tree(saved["ema"], resumed.ema.state_dict(), "ema")
    assert torch.equal(saved["rng"], resumed.generator.get_state())

    run_phase(resumed)
    assert resumed.step == cfg.steps
    ref_sd, got_sd = reference.state_dict(), resumed_model.state_dict()
    for k in ref_sd:
        assert torch.allclose(ref_sd[k], got_sd[k], atol=1e-6, rtol=0), (
            f"{k} differs from the uninterrupted run"
        )


def test_vq_pretrain_resumed_between_codebook_restarts_is_exact(tmp_path, photos):
    """Stage A phase 1 killed between two dead-code restarts: the code usage since the last restart
    is part of the state, so the resumed run re-seeds the same codes (it counted from zero, so
    codes used before the kill were re-seeded: the codebook differed by up to 0.67)."""
    from realdgen_core.train import ContentPretrain, ContentStageConfig

    hr = ArrayCropSampler(list(photos.values()))
    cfg = ContentStageConfig(pretrain_steps=6, batch_size=2, hr_crop=32, codebook_restart_every=3)
    reference = build_model(preset("tiny", 4), seed=0)
    run_phase(ContentPretrain(reference, cfg, hr, seed=3))

    model = build_model(preset("tiny", 4), seed=0)

    class SaveAtTwoThenKill(Hook):
        def on_step(self, ph, losses):
            if ph.step == 2:  # restarts run after steps 0, 2 (3rd) and 5: step 2's state is mid-cycle
                save_training_state(tmp_path / "ckpt", model, ph.state_dict())
            if ph.step == 4:
                raise Killed

    with pytest.raises(Killed):
        run_phase(ContentPretrain(model, cfg, hr, seed=3), [SaveAtTwoThenKill()])
    resumed_model = build_model(preset("tiny", 4), seed=99)
    state = load_training_state(tmp_path / "ckpt", resumed_model)
    assert int(state["vq_usage"].sum()) > 0
    resumed = ContentPretrain(resumed_model, cfg, hr, seed=3)
    resumed.load_state_dict(state)
    run_phase(resumed)
    for k, v in reference.state_dict().items():
        assert torch.allclose(v, resumed_model.state_dict()[k], atol=1e-6, rtol=0), k


# ------------------------------------------------------------------------------------------ pipeline


def _stop_after_save(monkeypatch, T, stop, exc: type[BaseException] = Killed):
    """Make the run's Checkpointer raise ``exc`` right after the step where ``stop(phase)`` holds
    (after that step's save, if any); returns the original ``on_step`` to restore."""
    original = T.Checkpointer.on_step

    def on_step(self, phase, losses):
        original(self, phase, losses)
        if stop(phase):
            raise exc

    monkeypatch.setattr(T.Checkpointer, "on_step", on_step)
    return original


def _photo_folder(tmp_path, photos) -> str:
    folder = tmp_path / "hr"
    folder.mkdir()
    for name, img in photos.items():
        Image.fromarray(img[:160, :160]).save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return str(folder)


def _manifest(tmp_path, hr: str, run: str, seed: int = 0) -> dict:
    return {
        "kind": "train",
        "preset": "tiny",
        "seed": seed,
        "data": {
            "hr": {"uri": hr},
            "lr": [{"kind": "synthetic", "degradations": ["realesrgan", "bsrgan"]}, {"kind": "camera"}],
        },
        "stage_a": {"pretrain_steps": 3, "finetune_steps": 3, "batch_size": 2, "hr_crop": 32},
        "stage_b": {"steps": 3, "batch_size": 2, "lr_crop": 8},
        "stage_c": {"steps": 4, "batch_size": 2, "lr_crop": 16},
        "output": {
            "run_dir": str(tmp_path / run),
            "checkpoint": str(tmp_path / f"{run}.safetensors"),
            "checkpoint_every": 2,
        },
        "compute": {"torch_threads": 1},
        "progress": {"bar": False},
    }


def test_pipeline_resumes_after_kill_and_matches_uninterrupted_run(tmp_path, photos, monkeypatch):
    from pipelines import train as T
    from pipelines.manifest import ManifestError
    from realdgen_core.checkpoint import load_checkpoint

    hr = _photo_folder(tmp_path, photos)
    stages = ("A", "B", "C")
    full = T.train_worker(_manifest(tmp_path, hr, "full"), stages)
    assert full["completed"] == ["content_pretrain", "content_finetune", "degradation", "diffusion"]
    assert full["skipped_images"] == {"data.hr: not an image": 1}

    original = _stop_after_save(monkeypatch, T, lambda p: p.name == "degradation" and p.step == 2)
    with pytest.raises(Killed):
        T.train_worker(_manifest(tmp_path, hr, "killed"), stages)
    latest = json.loads((tmp_path / "killed" / "latest.json").read_text())
    assert (latest["phase"], latest["step"]) == ("degradation", 2)
    assert latest["completed"] == ["content_pretrain", "content_finetune"]
    monkeypatch.setattr(T.Checkpointer, "on_step", original)

    resumed = T.train_worker(_manifest(tmp_path, hr, "killed"), stages)
    assert resumed["timings"]["degradation"]["steps"] == 1  # continued at step 2 of 3
    assert "content_pretrain" not in resumed["timings"]  # finished phases are not rerun
    steps = [
        int(line.split(",")[0]) for line in (tmp_path / "killed/logs/degradation.csv").read_text().split()[1:]
    ]
    assert steps == [1, 2, 3]

    a, meta = load_checkpoint(tmp_path / "full.safetensors")
    b, _ = load_checkpoint(tmp_path / "killed.safetensors")
    assert meta["completed"] == full["completed"]
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6, rtol=0), f"{k}: resumed run differs"

    with pytest.raises(ManifestError, match="another manifest"):
        T.train_worker(_manifest(tmp_path, hr, "killed", seed=5), stages)


def test_train_cli_rejects_bad_manifest(tmp_path, capsys):
    from pipelines import train as T

    path = tmp_path / "m.yaml"
    path.write_text("kind: train\ndata: {hr: {uri: x}}\noutput: {run_dir: r}\nstage_b: {margin: -1}\n")
    assert T.main([str(path), "--stages", "B"]) == 2
    assert "stage_b.margin" in capsys.readouterr().err


def test_running_a_finished_training_again_keeps_what_calibrate_only_recorded(tmp_path):
    """All phases done: the command trains nothing and must not rewrite output.checkpoint (that
    dropped the calibration a later `--calibrate-only` had recorded in it); a missing one is
    exported again from the run folder."""
    import numpy as np

    from pipelines import train as T
    from realdgen_core.checkpoint import checkpoint_digest, load_checkpoint, save_checkpoint

    (tmp_path / "hr").mkdir()
    rs = np.random.RandomState(0)
    for i in range(2):
        Image.fromarray(rs.randint(0, 256, (80, 80, 3), dtype=np.uint8)).save(tmp_path / "hr" / f"{i}.png")
    out = tmp_path / "out.safetensors"
    m = {
        "kind": "train",
        "preset": "tiny",
        "stages": ["C"],
        "data": {"hr": {"uri": str(tmp_path / "hr")}, "lr": [{"kind": "synthetic"}]},
        "stage_c": {"steps": 1, "batch_size": 1, "lr_crop": 16},
        "output": {"run_dir": str(tmp_path / "run"), "checkpoint": str(out)},
        "compute": {"torch_threads": 1},
        "progress": {"bar": False},
    }
    first = T.train_worker(m, ("C",))
    model, meta = load_checkpoint(out)
    meta = {k: v for k, v in meta.items() if k != "digest"} | {"calibration": {"tau_max": 0}}
    save_checkpoint(out, model, meta)  # what --calibrate-only does
    again = T.train_worker(m, ("C",))
    assert again["timings"] == {} and again["completed"] == ["diffusion"]
    assert load_checkpoint(out)[1]["calibration"] == {"tau_max": 0}
    assert again["model_digest"] == first["model_digest"] == checkpoint_digest(out)
    out.unlink()
    assert T.train_worker(m, ("C",))["model_digest"] == first["model_digest"] and out.exists()
    # a run stopped between its last state checkpoint and the final export leaves a mid-phase export
    # (or a stale one) there: the finished model is exported again, byte for byte the first one
    for stale in ({"partial": "diffusion at step 0/1"}, {"manifest_digest": "0" * 64}):
        meta = {k: v for k, v in load_checkpoint(out)[1].items() if k != "digest"} | stale
        save_checkpoint(out, model, meta)
        again = T.train_worker(m, ("C",))
        assert again["model_digest"] == first["model_digest"] == checkpoint_digest(out), stale
        assert "partial" not in load_checkpoint(out)[1]


@pytest.mark.parametrize(
    "text, says",
    [
        ('{"checkpoint": "../../elsewhere", "manifest_digest": "x"}', "ckpt-<9 digits>"),
        ('{"checkpoint": "ckpt-000000003/../x", "manifest_digest": "x"}', "ckpt-<9 digits>"),
        ('["ckpt-000000003"]', "not a checkpoint pointer"),
        ('{"checkpoint": "ckpt-000000003"}', "manifest_digest"),
        ("{not json", "not a JSON checkpoint pointer"),
    ],
)
def test_a_latest_pointer_that_names_a_path_or_is_not_ours_is_refused(tmp_path, text, says):
    """latest.json names the checkpoint folder to resume from: only the tool's own names are
    followed, never a path out of the run folder, and a damaged pointer is named, not a traceback."""
    from pipelines import train as T
    from pipelines.manifest import ManifestError

    run = tmp_path / "run"
    run.mkdir()
    (run / "latest.json").write_text(text)
    with pytest.raises(ManifestError, match=re.escape(says)) as err:
        T.RunStore(str(run)).latest()
    assert "latest.json" in str(err.value)
    (run / "latest.json").write_text('{"checkpoint": "ckpt-000000003", "manifest_digest": "x"}')
    assert T.RunStore(str(run)).latest()["checkpoint"] == "ckpt-000000003"


def test_an_export_of_an_unfinished_run_says_so_and_generation_warns(tmp_path, photos, monkeypatch):
    """The model exported when a phase ends lists that phase as done, names the phases the run has
    still to train (``partial``) and the parts never trained (``untrained``); the generation job's
    preflight turns either into a warning. A run stopped there used to export a model that listed
    one phase fewer and looked finished."""
    from pipelines import train as T
    from pipelines.generate.plan import unfinished_training
    from realdgen_core.checkpoint import load_checkpoint

    hr = _photo_folder(tmp_path, photos)
    m = _manifest(tmp_path, hr, "run")
    m["output"]["export_every"] = False  # only the exports written when a phase ends
    original = _stop_after_save(monkeypatch, T, lambda p: p.name == "degradation" and p.step == 2)
    with pytest.raises(Killed):
        T.train_worker(m, ("A", "B", "C"))
    _, meta = load_checkpoint(tmp_path / "run.safetensors")
    assert meta["completed"] == ["content_pretrain", "content_finetune"]
    assert meta["partial"] == "still to train: degradation, diffusion"
    assert meta["untrained"] == ["degradation", "diffusion"]
    warning = unfinished_training(meta)
    assert "still to train: degradation, diffusion" in warning
    assert "never trained: degradation, diffusion" in warning
    monkeypatch.setattr(T.Checkpointer, "on_step", original)

    T.train_worker(m, ("A", "B", "C"))  # resumed to the end: a finished model, no warning
    _, meta = load_checkpoint(tmp_path / "run.safetensors")
    assert meta["completed"] == ["content_pretrain", "content_finetune", "degradation", "diffusion"]
    assert "partial" not in meta and "untrained" not in meta and unfinished_training(meta) is None

    # every step count 0: all four phases "complete", nothing trained
    zero = _manifest(tmp_path, hr, "zero")
    zero["stage_a"].update(pretrain_steps=0, finetune_steps=0)
    zero["stage_b"]["steps"] = zero["stage_c"]["steps"] = 0
    T.train_worker(zero, ("A", "B", "C"))
    _, meta = load_checkpoint(tmp_path / "zero.safetensors")
    assert meta["untrained"] == ["content_pretrain", "content_finetune", "degradation", "diffusion"]


def test_a_checkpoint_another_run_wrote_is_not_replaced_without_the_flag(tmp_path, photos, capsys):
    """output.checkpoint naming a model another manifest trained (a copied demo manifest still names
    the demo checkpoint) is refused before any training; the same manifest run again is not; the
    flag lets it replace the file."""
    import hashlib

    import yaml

    from pipelines import train as T

    hr = _photo_folder(tmp_path, photos)
    m = _manifest(tmp_path, hr, "run")
    for stage, key in (("stage_a", "pretrain_steps"), ("stage_a", "finetune_steps"), ("stage_b", "steps")):
        m[stage][key] = 1
    m["stage_c"]["steps"] = 1
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(m))
    assert T.main([str(first)]) == 0
    out = tmp_path / "run.safetensors"
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    assert T.main([str(first)]) == 0  # the same manifest again: its own model, nothing refused
    capsys.readouterr()

    other = tmp_path / "other.yaml"
    other_output = {**m["output"], "run_dir": str(tmp_path / "other")}
    other.write_text(yaml.safe_dump({**m, "seed": 7, "output": other_output}))
    assert T.main([str(other)]) == 2
    err = capsys.readouterr().err
    assert "output.checkpoint" in err and "another training manifest" in err
    assert "--overwrite-checkpoint" in err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha  # untouched
    assert not (tmp_path / "other").exists()  # refused before any training

    out.write_text("not a checkpoint")
    assert T.main([str(other)]) == 2
    assert "not a readable RealDGen checkpoint" in capsys.readouterr().err

    assert T.main([str(other), "--overwrite-checkpoint"]) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() != sha


def test_ctrl_c_during_training_prints_how_to_resume_not_a_traceback(tmp_path, photos, capsys, monkeypatch):
    import yaml

    from pipelines import train as T

    hr = _photo_folder(tmp_path, photos)
    m = _manifest(tmp_path, hr, "run")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(m))

    # after the first save (checkpoint_every 2)
    _stop_after_save(monkeypatch, T, lambda p: p.step == 2, KeyboardInterrupt)
    assert T.main([str(path)]) == 130
    err = capsys.readouterr().err
    said = "[train] interrupted; the state of its last checkpoint (ckpt-000000001, content_pretrain step 2)"
    assert said in err, err
    assert str(tmp_path / "run") in err and "run the same command to resume" in err
    assert "Traceback" not in err

    def at_once(self, phase, losses):
        raise KeyboardInterrupt

    monkeypatch.setattr(T.Checkpointer, "on_step", at_once)
    m["output"]["run_dir"] = str(tmp_path / "fresh")
    m["output"]["checkpoint"] = str(tmp_path / "fresh.safetensors")
    path.write_text(yaml.safe_dump(m))
    assert T.main([str(path)]) == 130
    assert "before its first checkpoint: nothing to resume" in capsys.readouterr().err


def test_a_source_with_no_usable_image_is_refused_before_stage_a(tmp_path, photos, capsys):
    """Stage C's LR folder holding only a broken and a too-small image used to stop the run when
    stage C started, after stages A and B had trained; it is found before any training now, naming
    the source, the crop size and the counts. A folder with one usable image among them passes."""
    import yaml

    from pipelines import train as T

    hr = _photo_folder(tmp_path, photos)
    lr = tmp_path / "lr"
    lr.mkdir()
    (lr / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    Image.new("RGB", (6, 6)).save(lr / "tiny.png")
    m = _manifest(tmp_path, hr, "run")
    m["data"]["lr"] = [{"kind": "images", "source": {"uri": str(lr)}}]
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(m))
    assert T.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.lr.0.source: no usable image of at least 16x16 px" in err, err
    assert "(1 broken, 1 smaller, of 2;" in err
    assert not (tmp_path / "run").exists()  # nothing trained, no run folder

    # HR crops of stage A larger than every HR image: the same, for data.hr
    big = yaml.safe_load(path.read_text())
    big["data"]["lr"] = [{"kind": "synthetic"}]
    big["stage_a"]["hr_crop"] = 512
    path.write_text(yaml.safe_dump(big))
    assert T.main([str(path), "--stages", "A"]) == 2
    assert "data.hr: no usable image of at least 512x512 px" in capsys.readouterr().err

    Image.fromarray(next(iter(photos.values()))[:64, :64]).save(lr / "ok.png")
    path.write_text(yaml.safe_dump(m))
    assert T.main([str(path), "--stages", "C"]) == 0
    # progress.bar false: plain lines for logs (start, every tenth with the losses, end)
    err = capsys.readouterr().err
    assert "[train] diffusion: 4 steps" in err and "[train] diffusion: done" in err, err
    assert [int(s) for s in re.findall(r"\[train\] diffusion: step (\d+)/4, loss ", err)] == [1, 2, 3, 4]


def test_a_damaged_newest_checkpoint_resumes_from_the_older_one_kept(tmp_path, photos, capsys):
    """latest.json's checkpoint with a garbage state.pt, a truncated model or a file missing: the
    run passes over it (a warning names the file, never torch's advice to load with
    weights_only=False) and resumes from the newest older checkpoint `keep_last` kept, ending on
    the uninterrupted run's weights; with nothing usable left it is one error line."""
    from pipelines import train as T
    from pipelines.manifest import ManifestError
    from realdgen_core.checkpoint import load_checkpoint

    hr = _photo_folder(tmp_path, photos)
    stages = ("A", "B", "C")
    full = T.train_worker(_manifest(tmp_path, hr, "full"), stages)
    run = tmp_path / "full"
    ckpts = sorted(p.name for p in run.glob("ckpt-*"))
    assert len(ckpts) >= 2  # keep_last's default keeps more than one
    newest = json.loads((run / "latest.json").read_text())["checkpoint"]
    assert newest == ckpts[-1]
    (run / newest / "state.pt").write_bytes(b"garbage, not a pickle")
    # rerun: all phases were complete in the damaged state; the older one is mid-way or complete
    capsys.readouterr()
    again = T.train_worker(_manifest(tmp_path, hr, "full"), stages)
    err = capsys.readouterr().err
    assert f"{newest}/state.pt is not a readable training state" in err and "weights_only" not in err, err
    assert f"resuming from the older {ckpts[-2]} instead" in err
    assert again["model_digest"] == full["model_digest"]  # resumed exactly to the same weights
    assert load_checkpoint(tmp_path / "full.safetensors")[1]["digest"] == full["model_digest"]

    # a whole checkpoint of another model (the code changed since): named as such, not passed over
    from realdgen_core.checkpoint import save_checkpoint

    newest = json.loads((run / "latest.json").read_text())["checkpoint"]
    save_checkpoint(run / newest / "model.safetensors", build_model(preset("tiny", 2), seed=0), {})
    with pytest.raises(ManifestError, match="holds another model than this manifest builds"):
        T.train_worker(_manifest(tmp_path, hr, "full"), stages)

    for name in sorted(p.name for p in run.glob("ckpt-*")):
        (run / name / "model.safetensors").write_bytes(b"{}")
    with pytest.raises(ManifestError, match="no checkpoint there can be resumed") as info:
        T.train_worker(_manifest(tmp_path, hr, "full"), stages)
    assert "model.safetensors" in str(info.value) and "/tmp" not in str(info.value).replace(str(tmp_path), "")
    assert "move the run folder away" in str(info.value)


def test_a_second_run_into_a_run_folder_in_use_is_refused(tmp_path, photos, capsys):
    """Two runs of one run folder at once: the second "resumed" from the first's checkpoints mid-run
    and deleted them under it. The run folder has the generation job's lock now: a live holder
    (this test's own pid, on this host) refuses the second run before it trains; a finished run
    leaves no lock behind."""
    import os
    import socket
    import time

    import yaml

    from pipelines import train as T

    hr = _photo_folder(tmp_path, photos)
    m = _manifest(tmp_path, hr, "run")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(m))
    run = tmp_path / "run"
    run.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": "another", "heartbeat": time.time()}
    (run / "_lock.json").write_text(json.dumps(holder))
    assert T.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert "error: output.run_dir:" in err and "being written by another live job" in err, err
    assert not (run / "latest.json").exists() and not (tmp_path / "run.safetensors").exists()

    (run / "_lock.json").unlink()
    assert T.main([str(path)]) == 0
    assert (run / "latest.json").exists() and not (run / "_lock.json").exists()

    # a lock taken over mid-run (the heartbeat found another holder): the next save stops the run
    from types import SimpleNamespace

    from pipelines.manifest import ManifestError

    lost = SimpleNamespace(lost="taken over by another run (test)")
    with pytest.raises(ManifestError, match="output.run_dir: taken over by another run"):
        T.train_worker(_manifest(tmp_path, hr, "other"), ("A",), lock=lost)
    assert not (tmp_path / "other" / "latest.json").exists()
