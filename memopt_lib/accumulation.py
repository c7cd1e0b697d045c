"""Gradient accumulation: the gradient of a big batch, computed a micro-batch at a time.

What it saves: activations. A step on ``B`` rows keeps the activations of ``B``
rows alive until its backward; ``k`` micro-batches of ``B/k`` rows keep only one
micro-batch's at a time (each backward frees its graph before the next forward).
Gradients are *summed into* ``param.grad`` by every ``backward()``, so after the
``k``-th micro-batch they hold the full batch's gradient -- if the loss is scaled
right. What it costs: the ``k`` forward/backward passes run one after the other
on smaller matrices (less parallel work per kernel launch), and the gradients
(one fp32 copy of the trainable weights) stay alive across the forwards.
Weights, gradients and optimizer state do not shrink at all.

The scale that makes it exact
-----------------------------
A causal LM's loss is the *mean over target tokens* of the batch. With padding,
micro-batches hold different numbers of target tokens, so the mean of per-micro-
batch means (the seed's ``loss / accumulation_steps``) weights a token of a short
micro-batch more than one of a long micro-batch: a different gradient. This is
the bug that made Hugging Face Trainer's accumulated losses wrong until late 2024.
The fix: count the target tokens ``N`` of the *whole window* first, and give each
micro-batch ``sum of its token losses / N``. transformers does exactly that when
a model is called with ``num_items_in_batch=N`` (reduction ``sum``, divided by N).

Counting "target tokens" the way the loss does: Hugging Face causal LMs shift the
labels inside the model (position ``t`` predicts label ``t+1``), so the first
label of every row is never a target. A row's targets are its labels ``!= -100``
at positions ``1..T-1``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
Normalization = Literal["tokens", "per_micro_batch"]


def count_target_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Target tokens a causal-LM loss averages over: labels ``!= ignore_index`` after the shift."""
    if labels.dim() < 2:
        raise ValueError(f"labels must be (batch, seq), got shape {tuple(labels.shape)}")
    return int((labels[..., 1:] != ignore_index).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of the per-token cross-entropies, shifted like Hugging Face's ``ForCausalLMLoss``.

    Computed in fp32 (as transformers does) with ``F.cross_entropy(reduction="sum")``.
    Dividing by :func:`count_target_tokens` gives the model's own ``.loss``.
    """
    shift_logits = logits[..., :-1, :].float().reshape(-1, logits.size(-1))
    shift_labels = labels[..., 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction="sum")


def split_batch(batch: dict, k: int) -> list[dict]:
    """Cut a batch into ``k`` micro-batches along the batch dimension (views, no copy)."""
    rows = next(iter(batch.values())).shape[0]
    if not 1 <= k <= rows:
        raise ValueError(f"k={k} micro-batches of a batch of {rows} rows: choose 1 <= k <= {rows}")
    parts = {key: torch.tensor_split(t, k, dim=0) for key, t in batch.items()}
    return [{key: parts[key][i] for key in batch} for i in range(k)]


def micro_batch_loss(model: torch.nn.Module, micro_batch: dict, num_items_in_batch: int | torch.Tensor,
                     ) -> torch.Tensor:
    """``sum of this micro-batch's token losses / num_items_in_batch`` via the model's own loss.

    transformers' ``ForCausalLMLoss`` switches to ``reduction="sum"`` and divides by
    ``num_items_in_batch`` when it is given; the HF Trainer passes the window's token count.
    """
    n = torch.as_tensor(num_items_in_batch)
    if int(n) <= 0:
        raise ValueError("num_items_in_batch must be the number of target tokens of the window (> 0); "
                         "is every label -100?")
    if "labels" not in micro_batch:
        raise KeyError("each micro-batch needs 'labels' (use labels=-100 for padding)")
    return model(**micro_batch, num_items_in_batch=n).loss


@dataclass
class AccumulationResult:
    """What one accumulated window did: its mean loss and how it was weighted."""

    loss: float                   # the window's loss (mean over all its target tokens)
    n_target_tokens: int          # N, the window's target-token count
    tokens_per_micro_batch: list[int]
    normalization: str


LossFn = Callable[[torch.nn.Module, dict, int], torch.Tensor]


def accumulate(model: torch.nn.Module, micro_batches: Sequence[dict], *, normalization: Normalization = "tokens",
               autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
               scaler: torch.amp.GradScaler | None = None, loss_fn: LossFn | None = None,
               target_tokens: Sequence[int] | None = None) -> AccumulationResult:
    """Add the gradient of the window's loss to ``param.grad``, one micro-batch at a time.

    ``normalization="tokens"`` (the default, exact): every micro-batch's loss is
    ``sum of token losses / N`` with ``N`` the target tokens of the whole window, so
    the gradients equal the full batch's. ``"per_micro_batch"`` is the seed's
    ``loss / accumulation_steps`` (mean of means): kept only to measure its error.

    ``loss_fn(model, micro_batch, num_items_in_batch)`` computes the token-normalized
    loss (default :func:`micro_batch_loss`, the model's own loss); a recipe passes
    another one here, e.g. :func:`memopt_lib.chunked_loss.chunked_loss_fn`.

    ``target_tokens``: each micro-batch's target-token count, when the caller knows it without reading the
    labels (an unpadded batch of ``r`` rows of ``T`` tokens has ``r * (T - 1)``; meta tensors, as the GPU
    predictor runs them, have shapes but no values to count). Default: :func:`count_target_tokens`.

    Gradients are *added*: call ``optimizer.zero_grad(set_to_none=True)`` before
    and ``optimizer.step()`` after (see :func:`accumulation_step`).
    """
    if normalization not in ("tokens", "per_micro_batch"):
        raise ValueError(f"normalization must be 'tokens' or 'per_micro_batch', got {normalization!r}")
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError("accumulate() needs at least one micro-batch")
    ctx = autocast or contextlib.nullcontext
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    loss_fn = loss_fn or micro_batch_loss
    if loss_fn is not micro_batch_loss and normalization != "tokens":
        raise ValueError("a custom loss_fn is token-normalized by construction; use normalization='tokens'")
    if target_tokens is None:
        counts = [count_target_tokens(mb["labels"]) for mb in micro_batches]
    else:
        counts = [int(n) for n in target_tokens]
        if len(counts) != len(micro_batches) or min(counts) < 0:
            raise ValueError(f"target_tokens must give one count >= 0 per micro-batch ({len(micro_batches)}), "
                             f"got {list(target_tokens)}")
    total = sum(counts)
    if total == 0:
        raise ValueError("the window has no target tokens (all labels are -100)")
    window_loss = 0.0
    for mb, n in zip(micro_batches, counts):
        with ctx():
            if normalization == "tokens":
                loss = loss_fn(model, mb, total)
            else:
                loss = model(**mb).loss / len(micro_batches)
        # backward right away: it frees this micro-batch's activations before the next forward
        scaler.scale(loss).backward()
        window_loss += _value(loss)
        del loss  # the graph is gone after backward; drop the handle before the next forward
    return AccumulationResult(window_loss, total, counts, normalization)


def _value(loss: torch.Tensor) -> float:
    """The loss as a float; a meta tensor (the GPU predictor's) has a shape but no value: NaN."""
    return float("nan") if loss.device.type == "meta" else loss.item()


def accumulation_step(model: torch.nn.Module, micro_batches: Sequence[dict], optimizer: torch.optim.Optimizer,
                      **kwargs) -> AccumulationResult:
    """One optimizer step on the window: zero_grad, :func:`accumulate`, step."""
    # set_to_none frees the previous window's gradients before the first forward
    optimizer.zero_grad(set_to_none=True)
    result = accumulate(model, micro_batches, **kwargs)
    scaler = kwargs.get("scaler")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return result


def full_batch_gradients(model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """The reference: gradients of the model's mean loss on the whole batch in one pass (grads are reset)."""
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    out = gradients(model)
    model.zero_grad(set_to_none=True)
    return out


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter's ``.grad`` (``None`` grads are left out)."""
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def gradient_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Relative error ``||g - g_ref|| / ||g_ref||`` over all parameters (a missing gradient counts as 0)."""
    num, den = 0.0, 0.0
    for name, ref in reference.items():
        g = grads.get(name)
        diff = ref if g is None else (g.to(ref.dtype) - ref)
        num += float(diff.double().pow(2).sum())
        den += float(ref.double().pow(2).sum())
    return (num / den) ** 0.5 if den else float("inf")


def padded_micro_batches(lengths: Iterable[int], k: int, vocab_size: int, pad_id: int = 0, device="cpu",
                         seed: int = 0) -> tuple[dict, list[dict]]:
    """A right-padded batch of the given row lengths and its split into ``k`` micro-batches."""
    from .text import padded_batch
    batch = padded_batch(list(lengths), vocab_size, pad_id=pad_id, device=device, seed=seed)
    return batch, split_batch(batch, k)
