"""RealDGen core: degradation engine, networks, diffusion maths, generator, checkpoints (pure torch)."""

__version__ = "0.1.0"
