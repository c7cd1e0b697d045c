"""Predict a training step's CUDA memory from a CPU, in seconds (meta tensors + a replayed allocator)."""
from .allocator import CachingAllocator
from .gpus import GPU, GPUS, gpu
from .ladder import predict_ladder
from .step import StepOptions, predict_step

__all__ = ["CachingAllocator", "GPU", "GPUS", "gpu", "StepOptions", "predict_step", "predict_ladder"]
