"""Predict a training step's CUDA memory from a CPU, in seconds: meta tensors and a replayed allocator.

    python -m memopt_lib.predict --gpu h200 --model gpt2 --batch 8 --seq 1024 --json out.json --plot out.png
    python -m memopt_lib.predict goals --gpu h200 --json .ci/predictions/goals-h200.json   # issue 11's table

    from memopt_lib.predict import predict_step, predict_ladder
    p = predict_step("t4", "gpt2", 8, 512, "autocast")      # one step, any bench row
    p["peak_allocated_bytes"], p["peak_reserved_bytes"], p["breakdown_bytes"]
    p["flops"], p["host_transfer_bytes"]          # the step's work and its host<->GPU traffic (a cost model's inputs)
    rows = predict_ladder("h200", "llama-7b", 4, 512, ["QLoRA nf4+dq + ckpt"])  # the bench's row dicts

Why not just measure on the CPU? Because a CPU runs other kernels: its attention falls back to the
math path (the full attention matrix), its dropout saves float masks, its autocast has other op lists,
and it has no caching allocator. The predictor runs the *bench's own step*: the row's recipe is built by
:func:`memopt_lib.recipe.compose` (same model code, same transforms, same optimizer, same loss) on a
:class:`~memopt_lib.predict.target.MetaGPU` target and stepped by ``Composed.step`` on the meta device --
shapes without data, so a 7B costs nothing -- and it replays what a CUDA GPU does at every point where
the GPU would do something else:

==========================  ==========================================================  ================
mechanism                   what is replayed                                             where
==========================  ==========================================================  ================
attention kernel            flash (fp16/bf16, sm80+) / memory-efficient / math, as       cuda_semantics
                            ``select_sdp_backend`` picks; saved tensors of that kernel;
                            FlashAttention-2's backward scratch
dropout                     CUDA's fused ``native_dropout`` (1-byte mask)                cuda_semantics
autocast                    CUDA's fp16/fp32/promote op lists, the weight cache of       cuda_semantics
                            trainable leaves, restored by checkpointing's recompute
cuBLAS workspace            one per (handle, stream): forward thread + autograd thread   gpus.py
caching allocator           512 B rounding, small/large pools, 2/20 MiB and rounded      allocator.py
                            segments, best fit, splitting, merging, ``empty_cache``
optimizers                  torch AdamW foreach (the CUDA default) or fused, run as is;  target.py,
                            bnb AdamW8bit / PagedAdamW8bit state (paged: not counted)    bnb4bit.py
bitsandbytes 4-bit          NF4 packed n/2 bytes, absmax per 64 (double quant: uint8 +   bnb4bit.py
                            fp32 per 256), load-time bf16 copies, gemm_4bit's
                            dequantized-weight scratch
host memory                 the host embedding's table, offloaded activations (side-     target.py
                            stream path: a stash of 5, restores as new GPU tensors):
                            meta tensors outside the allocator; their traffic counted
measurement protocol        step 1, a steady step; the bench's settle() (gc,             step.py
                            empty_cache, reset peak) before the measured step
==========================  ==========================================================  ================

Constants that are not shapes, and where they come from (none is fitted to a measurement):
cuBLAS workspace 32 MiB on sm90+ / 8 MiB + 128 KiB before (PyTorch ``CublasHandlePool.cpp``); two of
them (cuBLAS handles are per thread; autograd's CUDA backward has its own thread); the allocator's
512 B / 1 MiB / 2 MiB / 10 MiB / 20 MiB (``CUDACachingAllocator.cpp``); bitsandbytes' 1536-row and
4-row limits of its custom 4-bit matmul (``bitsandbytes/backends/cuda/ops.py``; in between, the
dequantize path is assumed: an upper bound); FlashAttention-2's 128-row and 32-column rounding of its
backward scratch (``flash_api.cpp``).

Accuracy (``tests/test_predict.py``, every H200 measurement with a known configuration in the
repository -- :mod:`memopt_lib.predict.anchors`): peak allocated within -1.1 % / +0.6 % of all 29
(GPT-2 ladder, eager attention, fp16 + scaler, LoRA, 8-bit AdamW, the 7B QLoRA rows at batch 1, 4, 8;
steady-state and first-step peaks). Reserved memory depends on the exact order of allocations (and on
how a checkpoint is loaded), so it is a looser prediction: within 10 % of the bench's measured
``peak_reserved_bytes`` (GPT-2); the 7B QLoRA's is predicted about 10 % high (8.2 vs 7.5 GiB at B4),
and the anchors' ``max_reserved_GiB`` (protocol not recorded) is not compared.

Not modelled: multi-GPU, CUDA graphs, ``torch.compile``, ``PYTORCH_CUDA_ALLOC_CONF`` options, Liger's
fused cross-entropy (the chunked loss's ``auto`` backend on a GPU where ``liger-kernel`` is installed; the
predictor replays the pure-torch chunked backend), and
what a kernel allocates beyond what is listed above (a GPU run shows the remainder as
``unattributed``, about 20 MB for GPT-2).
"""
from .allocator import CachingAllocator
from .gpus import GPU, GPUS, gpu
from .ladder import predict_ladder
from .step import StepOptions, predict_step

__all__ = ["CachingAllocator", "GPU", "GPUS", "gpu", "StepOptions", "predict_step", "predict_ladder"]
