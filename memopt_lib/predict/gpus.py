"""The GPUs the predictor knows: what in a GPU decides how much memory a training step takes.

Only a few properties of a GPU change the bytes of a step (not the speed):

* **compute capability** -- it decides which attention kernel ``scaled_dot_product_attention`` picks
  (flash attention needs sm80+; the memory-efficient kernel runs from sm50), whether bf16 is native
  (sm80+; a T4 uses fp16 and a ``GradScaler``), which 4-bit matmul path bitsandbytes takes, and the
  size of the cuBLAS workspace (32 MiB on sm90+, 8 MiB + 128 KiB before);
* **memory size** -- what a row must fit in (``torch.cuda.get_device_properties().total_memory``);
* **SM count** -- bitsandbytes' 4-bit matmul heuristic reads it.

cuBLAS workspace: PyTorch's ``aten/src/ATen/cuda/CublasHandlePool.cpp`` (``parseChosenWorkspaceSize``)
allocates, through the caching allocator, one workspace per (cuBLAS handle, stream) pair:
``4096 KiB x 8`` = 32 MiB on compute capability 9.x-12.x, else ``:4096:2:16:8`` = 8 MiB + 128 KiB;
cuBLASLt shares it (``TORCH_CUBLASLT_UNIFIED_WORKSPACE``). Handles are per thread, and the autograd
engine runs a CUDA backward on its own device thread: a training step holds two workspaces.
"""
from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class GPU:
    name: str
    capability: tuple[int, int]
    memory_bytes: int       # total_memory as torch reports it
    sms: int                # streaming multiprocessors
    about: str = ""

    @property
    def native_bf16(self) -> bool:
        """bf16 tensor cores from sm80 (A100); a T4 (7.5) emulates bf16, so autocast uses fp16 there."""
        return self.capability >= (8, 0)

    @property
    def amp_dtype_name(self) -> str:
        """What ``memopt_lib.device.amp_dtype`` picks on this GPU."""
        return "bfloat16" if self.native_bf16 else "float16"

    @property
    def cublas_workspace_bytes(self) -> int:
        """One cuBLAS workspace (``CublasHandlePool.cpp``, default ``CUBLAS_WORKSPACE_CONFIG``)."""
        if 9 <= self.capability[0] <= 12:
            return 4096 * 1024 * 8
        return 4096 * 1024 * 2 + 16 * 1024 * 8

    @property
    def flash_attention(self) -> bool:
        """FlashAttention-2 kernels ship for sm80-sm9x (and are selected for fp16/bf16 only)."""
        return (8, 0) <= self.capability < (10, 0) or self.capability >= (12, 0)


GPUS: dict[str, GPU] = {
    "t4": GPU("t4", (7, 5), 15095 * MiB, 40, "NVIDIA Tesla T4 16 GB (Turing)"),
    "a100": GPU("a100", (8, 0), 81051 * MiB, 108, "NVIDIA A100-SXM4 80 GB (Ampere)"),
    "a100-40gb": GPU("a100-40gb", (8, 0), 40326 * MiB, 108, "NVIDIA A100 40 GB (Ampere)"),
    "h100": GPU("h100", (9, 0), 81559 * MiB, 132, "NVIDIA H100 SXM 80 GB (Hopper)"),
    "h200": GPU("h200", (9, 0), 143771 * MiB, 132, "NVIDIA H200 141 GB (Hopper; the anchors' GPU)"),
}


def gpu(name: str | GPU) -> GPU:
    """A GPU by name (case-insensitive); a clear error lists the known ones."""
    if isinstance(name, GPU):
        return name
    key = str(name).lower().strip()
    if key not in GPUS:
        raise KeyError(f"unknown GPU {name!r}; choose one of {sorted(GPUS)}")
    return GPUS[key]
