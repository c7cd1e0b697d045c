"""Chunked cross-entropy: the language-model loss without ever holding the full logits.

What it saves
-------------
A causal LM's last matmul turns each position's hidden state (``hidden`` wide) into one score per vocabulary
entry. For a batch of ``B x T`` tokens the logits are ``B * T * vocab`` values, and the plain loss keeps them
*and* an fp32 copy (transformers upcasts before ``cross_entropy``) *and* the softmax's gradient of the same
size in backward. At GPT-2 8 x 1024 (vocab 50257) one fp32 copy is 1.5 GiB; at the 7B's 8 x 512 (vocab 32000)
logits are the largest single activation of the step. Here the tokens are cut into chunks of
``chunk_tokens`` rows: each chunk's logits are computed, reduced to a loss, and freed; only the hidden states
(``hidden`` wide, 12-64x narrower than the vocabulary) are kept for backward. The peak holds one chunk's
logits, ``chunk_tokens * vocab`` values, whatever the batch.

What it costs
-------------
The logits are computed twice: once in forward (for the loss), once in backward (for the gradient,
``softmax - onehot``, one chunk at a time) -- one extra ``hidden x vocab`` matmul per token, a few percent of a
7B step. The result is the same sum of token losses as the plain path (:func:`plain_loss_sum`), up to the
order of floating-point additions.

On CUDA a maintained fused kernel does the same job faster: Liger's ``LigerFusedLinearCrossEntropyLoss`` (it
computes the gradient inside the forward, chunk by chunk, instead of recomputing it) is used when
``liger-kernel`` is installed; otherwise, and always on CPU, the pure-torch :class:`ChunkedLinearCrossEntropy`.

API: ``loss_fn = chunked_loss_fn(chunk_tokens=1024)`` is a loss function of the shape
:func:`memopt_lib.accumulation.accumulate` takes (``loss_fn(model, micro_batch, num_items_in_batch)``), so a
recipe swaps the model's own loss for this one without another branch in its training step.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .accumulation import IGNORE_INDEX

BACKENDS = ("auto", "torch", "liger")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the lm_head matmul runs in: asked of autocast itself, with an empty matmul.

    An empty ``(0, 1) @ (1, 0)`` product allocates nothing and takes whatever dtype the active autocast (any
    device's, or an emulation such as the GPU predictor's) gives a matmul; without autocast, ``x.dtype``.
    """
    return torch.matmul(x.new_empty((0, 1)), x.new_empty((1, 0))).dtype


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32 for 16-bit logits (as transformers' loss upcasts them); fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum_t CE(hidden_t @ weight.T, label_t)`` over rows, ``chunk_tokens`` rows at a time, recomputed in backward.

    ``hidden``: ``(N, H)``; ``weight``: ``(V, H)`` (the lm_head); ``labels``: ``(N,)`` already shifted, with
    ``ignore_index`` for rows that are not targets. Saved for backward: ``hidden``, ``weight`` and ``labels``
    only -- never a ``(N, V)`` tensor.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens: int, ignore_index: int, dtype: torch.dtype):
        total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=hidden.device)
        w = weight.to(dtype)  # one cast per pass (what autocast does per matmul), not kept for backward
        for s in range(0, hidden.shape[0], chunk_tokens):
            logits = _wide(hidden[s:s + chunk_tokens].to(dtype) @ w.t())  # this chunk only, freed next iteration
            total += F.cross_entropy(logits, labels[s:s + chunk_tokens], ignore_index=ignore_index, reduction="sum")
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_tokens, ctx.ignore_index, ctx.dtype = chunk_tokens, ignore_index, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype, step = ctx.dtype, ctx.chunk_tokens
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], step):
            h, y = hidden[s:s + step].to(dtype), labels[s:s + step]
            # recompute this chunk's logits: d loss / d logits = softmax - onehot (zero for ignored rows)
            g = torch.softmax(_wide(h @ w.t()), dim=-1)
            valid = (y != ctx.ignore_index).unsqueeze(1)
            # -1 at each valid row's label, then zero the ignored rows (no data-dependent indexing: the same
            # kernels on any device, meta tensors included)
            g.scatter_add_(1, y.clamp(min=0).unsqueeze(1), -valid.to(g.dtype))
            g.masked_fill_(~valid, 0.0)
            g = (g * grad_total).to(dtype)
            if need_h:
                grad_h[s:s + step] = (g @ w).to(hidden.dtype)
            if need_w:
                grad_w += _wide(g.t() @ h)
            del g
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels for position ``t`` = token ``t+1``; the last position of each row gets ``ignore_index``.

    Shifting the labels (not the hidden states) keeps ``hidden.reshape(-1, H)`` a view: no copy of the
    activations, as transformers' ``ForCausalLMLoss`` does it.
    """
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             chunk_tokens: int = 1024, ignore_index: int = IGNORE_INDEX,
                             backend: str = "auto") -> torch.Tensor:
    """Sum of the token cross-entropies of ``hidden @ weight.T`` against ``labels`` (unshifted, ``(B, T)``).

    ``backend``: ``"torch"`` (:class:`ChunkedLinearCrossEntropy`), ``"liger"`` (Liger's fused kernel, CUDA),
    ``"auto"`` (Liger on CUDA when installed, else torch).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int (rows of logits alive at once), got {chunk_tokens!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = shift_labels(labels, ignore_index).reshape(-1).to(h.device)
    dtype = _compute_dtype(h)
    use_liger = backend == "liger" or (backend == "auto" and h.device.type == "cuda" and liger_available())
    if use_liger:
        if h.device.type != "cuda":
            raise ValueError("backend='liger' needs CUDA (Triton kernels); use backend='torch' on CPU")
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")
        return loss(weight.to(dtype), h.to(dtype), y).float()
    return ChunkedLinearCrossEntropy.apply(h, weight, y, chunk_tokens, ignore_index, dtype)


def liger_available() -> bool:
    """Is Liger's fused linear cross-entropy importable (``pip install liger-kernel``; CUDA + Triton)?"""
    try:
        import liger_kernel.transformers.fused_linear_cross_entropy  # noqa: F401
    except Exception:  # ImportError, or Triton failing to initialise without a GPU
        return False
    return True


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(decoder body, lm_head)`` of a transformers causal LM, or of a peft model wrapping one.

    The body (``GPT2Model``, ``LlamaModel``) returns the final-normed hidden states; the head maps them to
    logits. LoRA layers and checkpointing live inside the body, so calling it keeps both.
    """
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    body = getattr(hf, "base_model", None)
    if head is None or body is None or body is hf:
        raise ValueError(f"{type(hf).__name__} is not a transformers causal LM with an output embedding; "
                         "chunked cross-entropy needs model.base_model and model.get_output_embeddings()")
    if getattr(head, "bias", None) is not None:
        raise ValueError("the lm_head has a bias; chunked cross-entropy supports bias-free heads (GPT-2, Llama)")
    if getattr(hf.config, "final_logit_softcapping", None):
        raise ValueError("logit soft-capping is not supported by the chunked loss; use the model's own loss")
    return body, head


def _head_weight(head: torch.nn.Module) -> torch.Tensor:
    # an 8-bit head (memopt_lib.placement) keeps int8 codes: it hands over its weight dequantized, per pass
    return head.dequantized_weight() if hasattr(head, "dequantized_weight") else head.weight


def chunked_loss_sum(model: torch.nn.Module, batch: dict, *, chunk_tokens: int = 1024,
                     backend: str = "auto") -> torch.Tensor:
    """The model's causal-LM loss *summed* over its target tokens, computed without the full logits."""
    if "labels" not in batch:
        raise KeyError("the batch needs 'labels' (use -100 for padding)")
    body, head = decoder_and_head(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = body(**inputs, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return linear_cross_entropy_sum(hidden, _head_weight(head), batch["labels"], chunk_tokens=chunk_tokens,
                                    backend=backend)


def chunked_loss_fn(chunk_tokens: int = 1024, backend: str = "auto") -> Callable:
    """A ``loss_fn(model, micro_batch, num_items_in_batch)`` for :func:`memopt_lib.accumulation.accumulate`.

    Returns ``sum of the micro-batch's token losses / num_items_in_batch`` -- token-normalized over the
    whole accumulation window, exactly like transformers' ``num_items_in_batch``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def loss_fn(model, micro_batch, num_items_in_batch):
        n = int(num_items_in_batch)
        if n <= 0:
            raise ValueError("num_items_in_batch must be the window's target-token count (> 0)")
        return chunked_loss_sum(model, micro_batch, chunk_tokens=chunk_tokens, backend=backend) / n

    return loss_fn


def plain_loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The reference: the same sum through the full logits (``model(**batch).logits``)."""
    from .accumulation import token_loss_sum
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return token_loss_sum(model(**inputs, use_cache=False).logits, batch["labels"])
