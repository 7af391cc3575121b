"""The shared training-loop pieces: a Phase (one optimiser over one loss), hooks, EMA, resumable state.

A stage is one or more phases (stage A: ``content_pretrain`` then ``content_finetune``; B:
``degradation``; C: ``diffusion``). A phase owns its trainable parameters, optimiser, CPU generator and
step counter; ``run_phase`` is the loop, read top to bottom::

    while phase.step < phase.total_steps:
        losses = phase.train_step()        # next batch -> loss -> backward -> clip -> step (-> EMA)
        for hook in hooks: hook.on_step(phase, losses)

Hooks do everything else (progress bar, CSV log, checkpoints every N steps, stopping early); a hook
may raise to stop the loop, which is how tests simulate a kill.

Batches: a phase's ``batch_fn()`` is a function of one ``torch.Generator`` only (crops, θ, degradations;
CPU tensors, no model), and step ``s`` draws its batch from a generator seeded by (run seed, phase,
rank, s). So a batch depends on its step alone: ``data_workers > 0`` builds the next batches in that
many DataLoader worker processes while the accelerator runs the current step, with the same bytes as
building them in-process (``data_workers = 0``), and a resumed run draws what the uninterrupted one
drew. Randomness inside the loss (stage C's t and ε) and codebook restarts use the phase's own
generator, which is part of the resumable state.

Host syncs: ``train_step`` returns the losses as detached tensors and never reads a value back, so
on a GPU the host queues step s+1 while step s runs; hooks convert to floats only when they log.
``precision="bf16"`` runs the loss forward under ``torch.autocast`` (bfloat16; backward and the
optimiser stay in float32).

Distributed data parallel: the loss of each phase is computed by ``phase.net``, an ``nn.Module``
whose forward returns a dict of losses. Pass ``wrap=`` (e.g. ``DistributedDataParallel``) and the
phase wraps that module, so gradients are averaged across workers by DDP itself.

Resumable state = model tensors (``realdgen_core.checkpoint``, safetensors) + ``phase.state_dict()``
(optimiser, EMA, step, RNG: tensors and primitives only, saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``, so no pickle runs on load).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

Wrap = Callable[[nn.Module], nn.Module]
BatchFn = Callable[[torch.Generator], tuple[Tensor, ...]]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


class Hook:
    """Base class: override what you need. Raising from a hook stops the loop."""

    def on_start(self, phase: Phase) -> None:  # noqa: B027 - optional override
        pass

    def on_step(self, phase: Phase, losses: dict[str, float]) -> None:
        pass

    def on_end(self, phase: Phase) -> None:
        pass


class EMA:
    """Exponential moving average of a module's float parameters (kept in float32 on the module's device)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for k, p in module.named_parameters():
            self.shadow[k].mul_(d).add_(p.detach().float(), alpha=1.0 - d)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for k, p in module.named_parameters():
            p.copy_(self.shadow[k].to(p.dtype))

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(sd))
        if missing:
            raise ValueError(f"EMA state lacks {missing[:3]}...")
        for k in self.shadow:
            self.shadow[k].copy_(sd[k])


def set_trainable(model: nn.Module, modules: Iterable[nn.Module]) -> None:
    """Freeze every parameter of ``model`` except those of ``modules``."""
    model.requires_grad_(False)
    for m in modules:
        m.requires_grad_(True)


def phase_seed(seed: int, phase_name: str, rank: int) -> int:
    """A stable 63-bit seed per (run seed, phase, worker rank) — no Python ``hash`` (it is salted)."""
    h = 1469598103934665603
    for ch in f"{seed}/{phase_name}/{rank}".encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 63)
    return h


class StepBatches(torch.utils.data.Dataset):
    """Item ``s`` = the batch of step ``s``: ``fn`` run on a generator seeded by ``phase_seed`` and ``s``."""

    def __init__(self, fn: BatchFn, seed: int, phase_name: str, rank: int) -> None:
        self.fn, self.seed, self.phase_name, self.rank = fn, seed, phase_name, rank

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(
            phase_seed(self.seed, f"{self.phase_name}/batch/{step}", self.rank)
        )

    def __getitem__(self, step: int) -> tuple[Tensor, ...]:
        return self.fn(self.generator(int(step)))

    def __len__(self) -> int:  # steps are addressed directly; the sampler says which
        return 2**62


def step_batches(
    fn: BatchFn, seed: int, phase_name: str, rank: int, steps: range, workers: int, pin: bool
) -> Iterator[tuple[Tensor, ...]]:
    """The batches of ``steps`` in order: in this process (``workers == 0``) or built ahead by a
    ``torch.utils.data.DataLoader`` with ``workers`` processes (same bytes either way)."""
    data = StepBatches(fn, seed, phase_name, rank)
    if workers <= 0:
        return (data[s] for s in steps)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        sampler=steps,
        num_workers=workers,
        prefetch_factor=4,
        pin_memory=pin,
        persistent_workers=False,
    )
    return iter(loader)


class Phase(ABC):
    """One optimisation phase. Subclasses set ``name``, build ``self.net`` and implement ``losses``."""

    name = "phase"

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        wrap: Wrap | None = None,
        grad_clip: float = 0.0,
        data_workers: int = 0,
        precision: str = "fp32",
    ) -> None:
        self.model = model
        self.total_steps = int(total_steps)
        self.step = 0
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.grad_clip = grad_clip
        self.generator = torch.Generator().manual_seed(phase_seed(seed, self.name, rank))
        self._wrap = wrap
        self.device = next(model.parameters()).device
        self.ema: EMA | None = None
        self.last_step_seconds = 0.0
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
        self.precision, self.data_workers = precision, int(data_workers)
        self._batches: Iterator[tuple[Tensor, ...]] | None = None

    # ------------------------------------------------------------------ set-up helpers for subclasses
    def _finish_init(self, net: nn.Module, param_groups: list[dict[str, Any]]) -> None:
        self.loss_module = net  # unwrapped (for evaluation on fixed batches)
        self.net = self._wrap(net) if self._wrap is not None else net
        groups = [g for g in param_groups if g["params"]]
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=0.0)

    # ------------------------------------------------------------------ the step
    @abstractmethod
    def batch_fn(self) -> BatchFn:
        """This phase's data: ``fn(generator) -> CPU tensors``, drawing every choice from the generator.
        It must not touch the model or the device (it may run in a DataLoader worker process)."""

    def loss_args(self) -> tuple:
        """Extra inputs of the loss after the batch (stage C passes the phase generator for t and ε)."""
        return ()

    def batch(self, step: int | None = None) -> tuple[Tensor, ...]:
        """The batch of ``step`` (default: the current one) on the phase's device, built in-process."""
        data = StepBatches(self.batch_fn(), self.seed, self.name, self.rank)
        return self._to_device(data[self.step if step is None else step])

    def _to_device(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(x.to(self.device, non_blocking=True) for x in batch)

    def next_batch(self) -> tuple[Tensor, ...]:
        if self._batches is None:
            self._batches = step_batches(
                self.batch_fn(),
                self.seed,
                self.name,
                self.rank,
                range(self.step, self.total_steps),
                self.data_workers,
                pin=self.device.type == "cuda",
            )
        return self._to_device(next(self._batches))

    def close(self) -> None:
        """Stop the batch workers (if any); the next ``train_step`` starts them again at ``self.step``."""
        self._batches = None

    def train_step(self) -> dict[str, Tensor]:
        """One optimiser step; returns the losses as detached tensors (no host sync)."""
        t0 = time.perf_counter()
        self.model.train()
        inputs = self.next_batch() + self.loss_args()
        dtype = PRECISIONS[self.precision]
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            losses = self.net(*inputs)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.grad_clip > 0:
            losses["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
        self.optimizer.step()
        self.after_step()
        self.step += 1
        self.last_step_seconds = time.perf_counter() - t0
        return {k: v.detach() for k, v in losses.items()}

    def after_step(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Called after each optimiser step (EMA updates, codebook restarts)."""

    def gather_for_checkpoint(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Collective, called on every rank before rank 0 writes a checkpoint: gather what each
        rank holds alone into what ``state_dict`` saves (e.g. stage A's code usage)."""

    def finalize(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Called once the phase is done, before the model is exported (e.g. copy the EMA in)."""

    # ------------------------------------------------------------------ resumable state
    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {
            "phase": self.name,
            "step": self.step,
            "total_steps": self.total_steps,
            "optimizer": self.optimizer.state_dict(),
            "rng": self.generator.get_state(),
        }
        if self.ema is not None:
            sd["ema"] = self.ema.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["phase"] != self.name:
            raise ValueError(f"state is for phase {sd['phase']!r}, not {self.name!r}")
        self.step = int(sd["step"])
        self.close()
        self.optimizer.load_state_dict(sd["optimizer"])
        self.generator.set_state(sd["rng"])
        if self.ema is not None:
            if "ema" not in sd:
                raise ValueError(f"state of phase {self.name!r} has no EMA")
            self.ema.load_state_dict(sd["ema"])


def run_phase(phase: Phase, hooks: Sequence[Hook] = ()) -> Phase:
    """The loop: step until ``total_steps``; hooks see every step (and may raise to stop)."""
    for hook in hooks:
        hook.on_start(phase)
    try:
        while phase.step < phase.total_steps:
            losses = phase.train_step()
            for hook in hooks:
                hook.on_step(phase, losses)
    finally:
        phase.close()
    phase.finalize()
    for hook in hooks:
        hook.on_end(phase)
    return phase


def save_model(path, model: nn.Module, metadata: dict | None = None) -> str:
    """Write the usable model with ``realdgen_core.checkpoint.save_checkpoint``; returns its digest."""
    from realdgen_core.checkpoint import save_checkpoint

    return save_checkpoint(str(path), model, metadata=dict(metadata or {}))


def save_training_state(
    directory, model: nn.Module, phase_state: dict[str, Any], metadata: dict | None = None
):
    """Write ``model.safetensors`` (realdgen_core.checkpoint) and ``state.pt`` into a local directory.

    ``phase_state`` is a Phase.state_dict() plus anything primitive the caller adds (e.g. the list of
    completed phases). Returns the model digest.
    """
    from pathlib import Path

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    digest = save_model(d / "model.safetensors", model, metadata)
    tmp = d / "state.pt.tmp"
    torch.save(phase_state, tmp)
    tmp.replace(d / "state.pt")
    return digest


def load_training_state(directory, model: nn.Module) -> dict[str, Any]:
    """Load ``model.safetensors`` into ``model`` (in place) and return ``state.pt`` (weights_only)."""
    from pathlib import Path

    d = Path(directory)
    load_model_weights(d / "model.safetensors", model)
    return read_training_state(d / "state.pt")


def load_model_weights(path, model: nn.Module) -> None:
    """A checkpoint file's tensors into ``model`` (in place; a DDP wrapper's module). A bad file is a
    ``CheckpointError``; a whole file of another architecture, ``load_state_dict``'s RuntimeError."""
    from realdgen_core.checkpoint import load_checkpoint

    loaded, _ = load_checkpoint(str(path))
    target = model.module if hasattr(model, "module") else model
    target.load_state_dict(loaded.state_dict())


def read_training_state(path) -> dict[str, Any]:
    """A ``state.pt`` as :func:`save_training_state` wrote it: tensors and primitives only
    (``weights_only``: nothing in it is unpickled as code)."""
    return torch.load(path, weights_only=True, map_location="cpu")


def floats(losses: dict[str, Tensor | float]) -> dict[str, float]:
    """Losses as Python floats (one host sync: call it only when logging)."""
    return {k: float(v) for k, v in losses.items()}
