"""The generation job as a small package, one job per module:

- :mod:`~pipelines.generate.plan`: preflight on the driver, listing as Ray tasks, plan blocks;
- :mod:`~pipelines.generate.references`: the reference bank (decode once, E_deg embeddings);
- :mod:`pipelines.stages`: decode/tile/pair, generation (actors), encode — plain callables;
- :mod:`~pipelines.generate.sink`: part files written by workers, per-shard compaction;
- :mod:`~pipelines.generate.job`: the driver that plans, streams, counts and indexes;
- :mod:`~pipelines.generate.console`: what reaches the console.

``pipelines/generate_dataset.py`` is the entry point (CLI).
"""

from pipelines.generate.job import GenerateJob, JobFailed, ensure_ray, run
from pipelines.generate.plan import Plan, checkpoint_calibration, make_plan

__all__ = ["GenerateJob", "JobFailed", "Plan", "checkpoint_calibration", "ensure_ray", "make_plan", "run"]
