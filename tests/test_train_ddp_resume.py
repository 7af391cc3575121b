"""Stage A's codebook restarts under DDP (two gloo processes, no Ray): a run killed between two
restarts and resumed from what rank 0 saved ends with the uninterrupted run's codebook."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel

        from realdgen_core.config import preset
        from realdgen_core.models import build_model
        from realdgen_core.train import ArrayCropSampler, ContentPretrain, ContentStageConfig, Hook, run_phase

        rs = np.random.RandomState(0)
        hr = ArrayCropSampler([rs.randint(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(4)])
        cfg = ContentStageConfig(pretrain_steps=6, batch_size=1, hr_crop=32, codebook_restart_every=3)
        kw = dict(seed=3, rank=rank, world_size=world, wrap=lambda m: DistributedDataParallel(m))
        whole = build_model(preset("tiny", 4), seed=0)
        run_phase(ContentPretrain(whole, cfg, hr, **kw))

        class Killed(Exception):
            pass

        saved: dict = {}

        class SaveThenKill(Hook):
            """What pipelines/train.py's checkpoint does at step 2, then a kill at step 4."""

            def on_step(self, phase, losses) -> None:
                if phase.step == 2:
                    phase.gather_for_checkpoint()  # collective, every rank
                    rngs = [None] * world
                    dist.all_gather_object(rngs, phase.generator.get_state())
                    states = [None] * world
                    dist.all_gather_object(states, copy.deepcopy(phase.state_dict()))
                    saved.update(states[0], rng_by_rank=rngs, model=copy.deepcopy(model.state_dict()))
                if phase.step == 4:
                    raise Killed

        model = build_model(preset("tiny", 4), seed=0)
        with pytest.raises(Killed):
            run_phase(ContentPretrain(model, cfg, hr, **kw), [SaveThenKill()])
        resumed = build_model(preset("tiny", 4), seed=7)
        resumed.load_state_dict(saved["model"])
        phase = ContentPretrain(resumed, cfg, hr, **kw)
        phase.load_state_dict(saved)
        phase.generator.set_state(saved["rng_by_rank"][rank])
        run_phase(phase)
        a, b = whole.content.quantizer.codebook.weight, resumed.content.quantizer.codebook.weight
        out[rank] = float((a - b).abs().max())
    finally:
        dist.destroy_process_group()


def test_a_ddp_resume_between_codebook_restarts_keeps_every_ranks_code_usage(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2)
        diffs = dict(out)
    # before, rank 0's own usage was saved for every rank: codes only rank 1 had used were re-seeded
    assert diffs == {0: 0.0, 1: 0.0}, diffs
