"""The memopt memory profiler: peak and breakdown of a training step on any device.

>>> from memopt_lib.profiler import measure, train_step_fn
>>> report = measure(train_step_fn(model, batch, opt), device=device, model=model, optimizer=opt)
>>> print(report)                       # peak, and what was alive at the peak
>>> report.peak_allocated_bytes         # the graded number

See :mod:`.tracker` for how the CPU number is made, :mod:`.cuda` for the GPU counters.
"""
from .cuda import CudaStats, SnapshotRecorder, read_stats, settle
from .measure import measure, time_calls, train_step_fn
from .plot import plot_breakdowns, plot_predicted_vs_measured, plot_report, plot_timeline
from .report import GiB, MiB, MemoryReport, fmt_bytes
from .saved import SavedTensors, saved_for_backward
from .tracker import CATEGORIES, PHASES, MemoryTracker, TrackerResult

__all__ = ["CATEGORIES", "PHASES", "CudaStats", "GiB", "MiB", "MemoryReport", "MemoryTracker", "SavedTensors", "SnapshotRecorder",
           "TrackerResult", "fmt_bytes", "measure", "plot_breakdowns", "plot_predicted_vs_measured", "plot_report",
           "plot_timeline", "read_stats", "saved_for_backward", "settle", "time_calls", "train_step_fn"]
