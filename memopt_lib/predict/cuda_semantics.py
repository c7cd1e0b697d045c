"""CUDA's device-dependent choices, made for meta tensors (attention kernel, dropout, autocast).

A meta tensor runs the CPU/meta code paths; a GPU takes others, which keep other tensors for backward.
:class:`CudaSemantics` (a ``TorchFunctionMode``, i.e. above autograd, so autograd saves what it would
save on a GPU) makes the device-dependent choices the way CUDA makes them:

* **attention** -- ``scaled_dot_product_attention`` runs the kernel the GPU would pick
  (``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``): flash attention for fp16/bf16 on
  sm80+ (cuDNN attention, preferred on sm90 by recent PyTorch, saves the same: the output and one
  fp32 statistic per query row), the memory-efficient kernel otherwise (fp32, or a T4). Both keep
  the output and a ``logsumexp`` for backward, never the ``B x H x S x S`` attention matrix; the
  math path (``attn_implementation="eager"``) keeps it. With an explicit mask the efficient kernel
  also keeps the mask (flash cannot take one).
* **dropout** -- ``at::dropout`` takes the fused ``native_dropout`` on CUDA, which saves a 1-byte
  boolean mask; the CPU/meta path would save a mask of the input's dtype (4 bytes in fp32).
* **autocast** -- CUDA autocast's op lists (``aten/src/ATen/autocast_mode.cpp``): matmuls, linear,
  addmm, bmm, baddbmm and SDPA cast their inputs to the 16-bit type; ``pow``, ``exp``, ``log``,
  ``rsqrt``, ``layer_norm``, ``softmax``, ``log_softmax``, ``sum``, ``cumsum`` and the losses run in
  fp32; ``cat``/``stack``/``addcmul`` promote to the widest input. Its **weight cache** is replayed:
  the 16-bit copy of a leaf fp32 tensor that requires grad (a trainable weight) is made once per
  autocast region and kept until the region closes (``torch.clear_autocast_cache``); frozen weights
  are cast at every use. The autocast *state* is carried by CPU autocast's flags
  (:func:`cuda_autocast`), so activation checkpointing restores it when it recomputes a block.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .gpus import GPU

# ------------------------------------------------------------------ CUDA autocast's op lists
_LOWER = {"linear", "addmm", "addmv", "addr", "matmul", "__matmul__", "__rmatmul__", "mm", "mv", "bmm",
          "baddbmm", "addbmm", "einsum", "chain_matmul", "multi_dot", "linalg_vecdot", "prelu", "conv1d",
          "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
          "scaled_dot_product_attention"}
_FP32 = {"acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
         "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "group_norm",
         "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss",
         "nll_loss", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
         "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
         "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
         "logsumexp"}
_FP32_OUT = {"softmax", "log_softmax", "sum", "cumsum", "cumprod", "prod"}  # given dtype=float32
_PROMOTE = {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sampler", "index_put",
            "scatter_add", "tensordot", "cat", "concat", "concatenate", "stack", "index_copy"}


class _AutocastCache:
    """Autocast's weight cache: 16-bit copies of trainable leaf weights, dropped when autocast exits."""

    def __init__(self):
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def clear(self):
        self.cache.clear()


_CACHE = _AutocastCache()


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype):
    """``torch.autocast("cuda", dtype)`` for meta tensors.

    Its state lives in CPU autocast's flags (which no meta tensor obeys) so that code which saves and
    restores autocast state -- activation checkpointing's recomputation -- carries it along;
    :class:`CudaSemantics` reads it and applies CUDA's lists. Leaving the outermost region clears the
    weight cache, as ``torch.clear_autocast_cache()`` does on a GPU.
    """
    with torch.autocast("cpu", dtype=dtype):
        yield


def _autocast_dtype() -> torch.dtype | None:
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return None


def _floating(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _cast_lower(t, dtype):
    if not _floating(t) or t.dtype == dtype:
        return t
    # autocast's cached_cast: only fp32 leaves that require grad (trainable weights), never views
    if t.dtype == torch.float32 and t.requires_grad and t.is_leaf and not t._is_view():
        hit = _CACHE.cache.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        out = t.to(dtype)
        _CACHE.cache[id(t)] = (t, out)
        return out
    return t.to(dtype)


def _cast_fp32(t):
    return t.to(torch.float32) if _floating(t) and t.dtype in (torch.float16, torch.bfloat16) else t


class CudaSemantics(TorchFunctionMode):
    """Make meta-device ops choose what CUDA chooses (attention backend, dropout kernel, autocast)."""

    def __init__(self, gpu: GPU):
        super().__init__()
        self.gpu = gpu
        self.sdpa_backends: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if func is torch.Tensor.backward:
            # a mode is off while its handler runs; run the engine with this mode back on, so that what
            # backward runs in Python (checkpointing's recomputation, custom autograd Functions) gets
            # CUDA's choices too (the engine call itself does not dispatch to torch-function modes)
            return self._backward(*args, **kwargs)
        if name == "dropout" and func in (F.dropout, torch.dropout, torch.nn.functional.dropout):
            return self._dropout(*args, **kwargs)
        adt = _autocast_dtype()
        if adt is not None and name:
            if name in _LOWER:
                args, kwargs = tree_map(lambda t: _cast_lower(t, adt), (args, kwargs))
            elif name in _FP32:
                args, kwargs = tree_map(_cast_fp32, (args, kwargs))
            elif name in _FP32_OUT and kwargs.get("dtype") is None and any(
                    _floating(t) and t.dtype in (torch.float16, torch.bfloat16) for t in tree_flatten(args)[0]):
                kwargs = {**kwargs, "dtype": torch.float32}
            elif name in _PROMOTE:
                flat = [t for t in tree_flatten((args, kwargs))[0] if _floating(t)]
                if flat:
                    wide = max((t.dtype for t in flat), key=lambda d: torch.finfo(d).bits)
                    args, kwargs = tree_map(lambda t: t.to(wide) if _floating(t) else t, (args, kwargs))
        if name == "scaled_dot_product_attention":
            return self._sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    def _backward(self, tensor, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        from torch.autograd.graph import _engine_run_backward
        with self:
            if gradient is None:
                gradient = torch.ones_like(tensor, memory_format=torch.preserve_format)
            retain = create_graph if retain_graph is None else retain_graph
            ins = () if inputs is None else tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
            _engine_run_backward((tensor,), (gradient,), retain, create_graph, ins,
                                 allow_unreachable=True, accumulate_grad=True)

    # -------------------------------------------------------------- dropout
    @staticmethod
    def _dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0 or input.device.type != "meta":
            return input if not training or p == 0 else F.dropout(input, p, training, inplace)
        if p == 1:
            return input * 0
        out, _mask = torch.native_dropout(input, p, True)  # CUDA: bool mask saved for backward
        if inplace:
            return input.copy_(out)
        return out

    # -------------------------------------------------------------- attention
    def backend_for(self, q, k, v, attn_mask, dropout_p) -> str:
        """Which kernel ``select_sdp_backend`` would run on this GPU (flash / efficient / math)."""
        half = q.dtype in (torch.float16, torch.bfloat16)
        d = q.shape[-1]
        same_d = q.shape[-1] == k.shape[-1] == v.shape[-1]
        if (self.gpu.flash_attention and half and attn_mask is None and same_d and d <= 256
                and (q.dtype != torch.bfloat16 or self.gpu.native_bf16)):
            return "flash"
        align = 8 if half else 4
        # the memory-efficient kernel takes bf16 only from sm80 (sdp_utils: less_than_sm80_mem_efficient_dtypes)
        dtype_ok = q.dtype != torch.bfloat16 or self.gpu.native_bf16
        if dtype_ok and d % align == 0 and v.shape[-1] % align == 0 and q.shape[-1] == k.shape[-1]:
            return "efficient"
        return "math"

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        if query.device.type != "meta":
            return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                                  scale=scale, enable_gqa=enable_gqa)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
        backend = self.backend_for(query, key, value, attn_mask, dropout_p)
        self.sdpa_backends[backend] = self.sdpa_backends.get(backend, 0) + 1
        if backend == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        if backend == "efficient":
            grad = any(t.requires_grad for t in (query, key, value))
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale)[0]
        # the math path, op by op as ``_scaled_dot_product_attention_math`` runs them on CUDA: it keeps the
        # B x H x S x S probabilities (and dropout's bool mask) for backward
        s = scale if scale is not None else query.shape[-1] ** -0.5
        attn = query @ (key.transpose(-2, -1) * s)
        if is_causal:
            L, S = query.shape[-2], key.shape[-2]
            causal = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
            attn = attn.masked_fill(~causal, float("-inf"))
        elif attn_mask is not None:
            attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
        attn = torch.softmax(attn, -1)
        if dropout_p > 0:
            attn = self._dropout(attn, dropout_p, True)
        return attn @ value
