"""The generation job as a small package, one job per module:

- :mod:`~pipelines.generate.plan`: preflight on the driver, listing as Ray tasks, plan blocks;
- :mod:`~pipelines.generate.references`: the reference bank (decode once, E_deg embeddings);
- :mod:`~pipelines.generate.stages`: decode/tile/pair, generation (actors), encode — plain callables;
- :mod:`~pipelines.generate.sink`: part files written by workers, per-shard compaction;
- :mod:`~pipelines.generate.job`: the driver that plans, streams, counts and indexes;
- :mod:`~pipelines.generate.console`: what reaches the console;
- :mod:`~pipelines.generate.config`: the stages' typed, frozen configurations.

``pipelines/generate_dataset.py`` is the entry point (CLI).
"""
