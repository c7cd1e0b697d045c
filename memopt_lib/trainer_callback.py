"""memopt inside the Hugging Face ``Trainer``: each step's peak memory and what it was made of.

Once a run moves from a hand-written loop to ``transformers.Trainer`` (or TRL's ``SFTTrainer``,
which is a ``Trainer``), the loop is no longer yours to wrap in :func:`memopt_lib.profiler.measure`.
A :class:`~transformers.TrainerCallback` is the hook the Trainer gives instead: it is called when
a step begins (before the first micro-batch's forward) and when it ends (after the optimizer step
and ``zero_grad``). :class:`MemoryCallback` opens the profiler's
:class:`~memopt_lib.profiler.MemoryTracker` at the first and closes it at the second, so one
optimizer step -- every micro-batch of gradient accumulation, the backward, the optimizer -- is
the measured region, and reports to the Trainer's logs (and so to its progress output and
``trainer.state.log_history``)::

    mem_peak_MiB          the highest step peak since the last log (allocated bytes: the CUDA
                          allocator's max_memory_allocated on a GPU, the tracker's live bytes elsewhere)
    mem_weights_MiB ...   that peak split into weights / gradients / optimizer / activations /
                          temporaries (+ unattributed on CUDA: workspaces the tracker cannot see)

Usage::

    from memopt_lib.trainer_callback import MemoryCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[MemoryCallback()])
    # or, to also show the peak on the progress bar and reach every reporter (wandb, tensorboard):
    memory = MemoryCallback.attach(trainer)
    trainer.train()
    print(memory.table())

What it costs: the tracker's Python hook runs on every operator of a tracked step, and each tracked
step starts by finding every live tensor (a garbage collection and a scan of the heap, as
``memory_allocated`` would count them: about 2 s per step in a process holding transformers and the
Trainer on 2 loaded CPU cores). The memory is the same; ``every_n_steps`` tracks fewer steps. Step 1 includes the creation of the
optimizer state (AdamW's two moments), so it is not a steady-state step: look at step 2 onward.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from transformers import TrainerCallback

from .profiler import MemoryTracker, fmt_bytes
from .profiler.cuda import read_stats, settle
from .profiler.report import MiB, combine_breakdown

PREFIX = "mem_"


@dataclass
class StepMemory:
    """Memory of one optimizer step of a Trainer run (bytes)."""

    step: int
    device: str
    peak_allocated_bytes: int
    peak_phase: str
    breakdown_bytes: dict[str, int] = field(default_factory=dict)
    source: str = "tracker"  # "tracker" (live storage bytes) or "cuda" (max_memory_allocated)

    def to_dict(self) -> dict:
        return asdict(self)

    def log_entries(self) -> dict[str, float]:
        """The numbers as the Trainer logs them: MiB, rounded, prefixed ``mem_``."""
        out = {f"{PREFIX}peak_MiB": round(self.peak_allocated_bytes / MiB, 1)}
        out.update({f"{PREFIX}{k}_MiB": round(v / MiB, 1) for k, v in self.breakdown_bytes.items()})
        return out


def _device_of(model: torch.nn.Module | None) -> torch.device:
    for p in (model.parameters() if model is not None else ()):
        return p.device
    return torch.device("cpu")


class MemoryCallback(TrainerCallback):
    """Measure each optimizer step's peak memory and its breakdown; report them in the Trainer's logs.

    Parameters
    ----------
    every_n_steps:
        Track steps 1, 1 + n, 1 + 2n, ... (the others run at full speed). Default: every step.
    breakdown:
        Split the peak into categories with the tracker. With ``False`` on a GPU only the CUDA
        allocator's peak is read (no per-operator hook, no slowdown); on a CPU the tracker is the
        only counter, so it always runs.
    """

    def __init__(self, every_n_steps: int = 1, breakdown: bool = True):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.breakdown = breakdown
        self.history: list[StepMemory] = []
        self._model = self._optimizer = None
        self._device = torch.device("cpu")
        self._tracker: MemoryTracker | None = None
        self._open = False  # a tracked step is running
        self._unlogged: list[StepMemory] = []
        self._bar = None  # the ProgressCallback whose tqdm bar shows the peak (set by attach)

    @classmethod
    def attach(cls, trainer, **kwargs) -> "MemoryCallback":
        """Add a new callback to ``trainer`` *first*, so every reporter sees its numbers, and show the
        peak on the terminal progress bar. Returns the callback (its ``history`` fills as it trains)."""
        from transformers.trainer_callback import ProgressCallback
        cb = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, cb)
        cb._bar = next((c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)), None)
        return cb

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._model = model
        # accelerate wraps the torch optimizer; the tracker recognises the inner one's step hooks and state
        self._optimizer = getattr(optimizer, "optimizer", optimizer)
        self._device = _device_of(model)

    def _tracked(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def on_step_begin(self, args, state, control, **kwargs):
        if not self._tracked(state.global_step):  # the step about to run is global_step + 1
            return
        self._open = True
        cuda = self._device.type == "cuda"
        if cuda:
            settle(self._device)  # reset_peak_memory_stats: the peak read at the end is this step's
        if self.breakdown or not cuda:
            self._tracker = MemoryTracker(self._device, model=self._model, optimizer=self._optimizer,
                                          timeline=False)
            self._tracker.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if not self._open:
            return
        tracker, self._tracker, self._open = self._tracker, None, False
        if tracker is not None:
            tracker.__exit__(None, None, None)
            tr = tracker.result()
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            peak = read_stats(self._device).max_allocated_bytes
            parts = combine_breakdown(tr.peak_breakdown_bytes, peak, tr.peak_bytes) if tracker else {}
            rec = StepMemory(state.global_step, str(self._device), peak, tr.peak_phase if tracker else "",
                             parts, "cuda")
        else:
            rec = StepMemory(state.global_step, str(self._device), tr.peak_bytes, tr.peak_phase,
                             dict(tr.peak_breakdown_bytes), "tracker")
        self.history.append(rec)
        self._unlogged.append(rec)
        bar = getattr(self._bar, "training_bar", None)
        if bar is not None:
            bar.set_postfix_str(f"peak {fmt_bytes(rec.peak_allocated_bytes)}", refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # training logs only (they carry the loss); evaluation logs are not about a training step
        if logs is None or "loss" not in logs or not self._unlogged:
            return
        worst = max(self._unlogged, key=lambda r: r.peak_allocated_bytes)
        self._unlogged = []
        entries = worst.log_entries()
        logs.update(entries)
        # the Trainer appended this log to its history just before calling us: add the numbers there too
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Stop a tracker left open by a step that raised (an OOM inside ``trainer.train()``, say): the Trainer
        calls no callback after an exception, and an open tracker would keep counting every later operation."""
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
        self._tracker, self._open = None, False

    # ------------------------------------------------------------------ reading
    @property
    def peak(self) -> StepMemory | None:
        """The tracked step with the highest peak."""
        return max(self.history, key=lambda r: r.peak_allocated_bytes, default=None)

    def table(self) -> str:
        """One line per tracked step: its peak, where it happened, and the breakdown."""
        if not self.history:
            return "no step was tracked"
        cats = list(self.history[0].breakdown_bytes)
        head = f"{'step':>5}  {'peak':>11}  {'phase':<9}" + "".join(f"{c:>13}" for c in cats)
        rows = [f"{r.step:>5}  {fmt_bytes(r.peak_allocated_bytes):>11}  {r.peak_phase:<9}"
                + "".join(f"{fmt_bytes(r.breakdown_bytes.get(c, 0)):>13}" for c in cats) for r in self.history]
        return "\n".join([f"memory per optimizer step on {self.history[0].device} ({self.history[0].source})",
                          head, *rows])
