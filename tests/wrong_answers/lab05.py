"""Wrong answers of lab 05 (gradient checkpointing)."""
import torch
from torch.utils.checkpoint import checkpoint

from . import Wrong


def _wrap(model, every=1, *, pick=lambda i, every: i % every == 0, reentrant=False, no_grad=False, cache_off=True):
    if cache_off:
        model.config.use_cache = False
    blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    for i, block in enumerate(blocks):
        if pick(i, every):
            if no_grad:
                def forward(*args, _plain=block.forward, **kwargs):
                    with torch.no_grad():  # "don't store activations"
                        return _plain(*args, **kwargs)
            else:
                def forward(*args, _plain=block.forward, **kwargs):
                    return checkpoint(_plain, *args, use_reentrant=reentrant, **kwargs)
            block.forward = forward
    return model


def shifted_blocks(model, every=1):
    return _wrap(model, every, pick=lambda i, every: (i + 1) % every == 0)


def reentrant(model, every=1):
    return _wrap(model, every, reentrant=True)


def under_no_grad(model, every=1):
    return _wrap(model, every, no_grad=True)


def every_ignored(model, every=1):
    return _wrap(model, 1)


def cache_left_on(model, every=1):
    return _wrap(model, every, cache_off=False)


def first_block_only(model, every=1):
    return _wrap(model, every, pick=lambda i, every: i == 0)


def floor_count(n_layers, every, block_input_bytes, block_bytes):
    k = n_layers // every
    return k * block_input_bytes + (n_layers - k) * block_bytes


def shifted_count(n_layers, every, block_input_bytes, block_bytes):
    k = sum((i + 1) % every == 0 for i in range(n_layers))
    return k * block_input_bytes + (n_layers - k) * block_bytes


def swapped(n_layers, every, block_input_bytes, block_bytes):
    k = len(range(0, n_layers, every))
    return k * block_bytes + (n_layers - k) * block_input_bytes


def flag_only(model):  # the seed's one-liner: the model stays in eval mode
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def train_only(model):
    model.train()
    return model


def eval_after(model):  # enables, trains, then "switches dropout off" with eval()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.eval()
    return model


S, A, P, F = "same_gradients", "saves_activations", "prediction", "active_after_from_pretrained"
WRONG = [
    Wrong("blocks (i + 1) % every", "checkpoint_blocks", shifted_blocks, (A,), r"expected blocks"),
    Wrong("reentrant checkpoint", "checkpoint_blocks", reentrant, (S,), r"use_reentrant=False"),
    Wrong("blocks under torch.no_grad()", "checkpoint_blocks", under_no_grad, (S,), r"no_grad"),
    Wrong("every ignored", "checkpoint_blocks", every_ignored, (A,), r"expected blocks"),
    Wrong("KV cache left on", "checkpoint_blocks", cache_left_on, (A,), r"use_cache"),
    Wrong("first block only", "checkpoint_blocks", first_block_only, (A,), r"expected blocks"),
    Wrong("predict: floor(n / every)", "predict_kept_bytes", floor_count, (P,), r"ceil"),
    Wrong("predict: (i + 1) % every", "predict_kept_bytes", shifted_count, (P,), r"0, every, 2\*every"),
    Wrong("predict: inputs and blocks swapped", "predict_kept_bytes", swapped, (P,), r"keep their input only"),
    Wrong("prepare: flag only (eval mode)", "prepare_for_checkpointed_training", flag_only, (F,), r"model\.train\(\)"),
    Wrong("prepare: train only", "prepare_for_checkpointed_training", train_only, (F,), r"not enabled"),
    Wrong("prepare: eval() at the end", "prepare_for_checkpointed_training", eval_after, (F,), r"eval mode"),
]
