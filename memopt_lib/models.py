"""The course's models, with the real hub path online and a same-shape local checkpoint offline.

Memory depends on shapes, not on the values of the weights. So when the
Hugging Face hub cannot be reached (CI, an air-gapped laptop), we build the
same architecture from its config with random weights, ``save_pretrained`` it
to a local directory once, and load it with the *same* ``from_pretrained`` call
(quantization config, dtype, device map and all). Every fallback prints one
line saying so -- a random GPT-2 measures like GPT-2 but writes gibberish.

Models
------
``gpt2``       GPT-2 124M (``openai-community/gpt2``).
``gpt2-tiny``  2 layers, 128 wide: unit tests and quick CPU demos.
``llama-7b``   Llama-2-7B shape (hidden 4096, 32 layers, 11008 MLP, vocab 32000);
               hub: ``NousResearch/Llama-2-7b-hf``, an ungated copy of Llama-2-7b-hf.
               (The seed text's "Llama-3.2-7B" does not exist: Llama 3.2 ships 1B and 3B.)
``gpt2-narrow`` GPT-2 at a quarter of its width (192, 3 heads of 64) and vocabulary (12,564), 12 layers:
               the CPU profile's GPT-2. At a quarter of the tokens (8 x 128 instead of 8 x 512) every
               part of a training step -- weights, gradients, AdamW state, activations, logits -- is about
               1/16 of GPT-2's at 8 x 512, so the shares of the peak, and every technique's ratio, are
               GPT-2's on a GPU while the step runs in about a second on 2 cores.
``llama-tiny`` 4 layers, 256 wide, same architecture: the CPU stand-in for the 7B. Its MLP width is
               704 (2.75 x 256; the 7B's ratio is 2.69): bitsandbytes' packed CPU kernel for
               4-bit inference (AVX512-BF16 CPUs) needs output widths divisible by 32.

Training configuration that keeps what CUDA keeps
-------------------------------------------------
A CPU measurement means what a GPU measurement means only if the CPU runs kernels
that *keep* the same tensors for backward. :func:`load_model` (``train=True``) sees
to three things at the source (measured on GPT-2, fp32, per layer, in units of
``batch x seq x hidden x 4`` bytes; ``tests/test_models.py`` asserts them):

* **No KV cache in training** (``config.use_cache = False``). A transformers 5
  forward with ``use_cache`` builds a ``DynamicCache`` whose ``torch.cat`` *copies*
  every layer's keys and values: +2 units per layer, on every device (+0.28 GiB,
  +3.6 %, for GPT-2 at 8 x 512 fp32 -- the whole excess of the GPU checks over the
  H200 anchors). ``generation_config.use_cache`` is left on: ``generate`` still caches.
* **No attention dropout** (``attn_pdrop = 0``; Llama's ``attention_dropout`` is 0
  already). CUDA's fused attention kernels apply dropout from a saved RNG seed and
  keep only the output and the log-sum-exp; CPU ``scaled_dot_product_attention``
  has no fused dropout, falls back to the math kernel and keeps the
  ``batch x heads x seq x seq`` probabilities and masks (26 extra units per layer at
  seq 512). Without attention dropout the CPU runs its flash kernel, which keeps
  what CUDA's keeps; on a GPU this changes no byte. (Pass ``attn_pdrop=0.1``
  explicitly to get GPT-2's original setting back.)
* **Dropout with a 1-byte mask** (:class:`MaskDropout`). ``nn.Dropout`` on CUDA
  runs ``native_dropout`` and saves a ``bool`` mask; on a CPU it multiplies by a
  noise tensor and saves it in the input's dtype (4 bytes in fp32).
  :func:`match_cuda_kernels` swaps every ``nn.Dropout`` for :class:`MaskDropout`,
  which calls ``native_dropout`` on every device (the same op CUDA already uses).
  Modules added later (peft's ``lora_dropout``) need another call.

With these, GPT-2 keeps 28.5 units per layer on a CPU -- the CUDA arithmetic --
against 54 with the defaults (see :func:`gpt2_layer_units`).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

NOTICE_PREFIX = "[memopt]"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "gpt2" or "llama"
    hub_id: str | None
    make_config: Callable[[], object]
    about: str


def gpt2_config(**kw):
    """A ``GPT2Config`` whose special token ids lie inside its vocabulary.

    ``GPT2Config`` defaults ``bos_token_id``/``eos_token_id`` to 50256, GPT-2's ``<|endoftext|>``;
    with a smaller ``vocab_size`` transformers warns that the id is outside the vocabulary.
    There the id is 0, where the course's offline tokenizer puts ``<|endoftext|>``.
    """
    from transformers import GPT2Config
    if kw.get("vocab_size", 50257) <= 50256:
        kw.setdefault("bos_token_id", 0)
        kw.setdefault("eos_token_id", 0)
    return GPT2Config(**kw)


_gpt2 = gpt2_config


def _llama(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(**kw)


LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                tie_word_embeddings=False)
LOCAL_VOCAB = 8192  # the offline tokenizer's size; tiny models use it so every token id is valid

SPECS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec("gpt2", "gpt2", "openai-community/gpt2", lambda: _gpt2(), "GPT-2 124M"),
    "gpt2-tiny": ModelSpec("gpt2-tiny", "gpt2", None,
                           lambda: _gpt2(n_layer=2, n_embd=128, n_head=4, n_positions=512, vocab_size=LOCAL_VOCAB,
                                         bos_token_id=0, eos_token_id=0),
                           "GPT-2 architecture, 2 layers x 128 (CPU tests)"),
    "gpt2-narrow": ModelSpec("gpt2-narrow", "gpt2", None,
                             lambda: _gpt2(n_embd=768 // 4, n_head=12 // 4, vocab_size=50257 // 4,
                                           bos_token_id=0, eos_token_id=0),
                             "GPT-2 at 1/4 width and vocabulary, 12 layers (the CPU profile's GPT-2)"),
    "llama-7b": ModelSpec("llama-7b", "llama", "NousResearch/Llama-2-7b-hf", lambda: _llama(**LLAMA_7B),
                          "Llama-2-7B shape"),
    "llama-tiny": ModelSpec("llama-tiny", "llama", None,
                            lambda: _llama(**{**LLAMA_7B, "hidden_size": 256, "intermediate_size": 704,
                                              "num_hidden_layers": 4, "num_attention_heads": 4,
                                              "num_key_value_heads": 4, "vocab_size": LOCAL_VOCAB,
                                              "max_position_embeddings": 1024,
                                              "bos_token_id": 0, "eos_token_id": 0}),
                            "Llama architecture, 4 layers x 256 (CPU stand-in for the 7B)"),
}


def spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose one of {sorted(SPECS)}") from None


def model_config(name: str):
    """The ``transformers`` config of a course model (no weights)."""
    return spec(name).make_config()


def cache_dir() -> Path:
    """Where local checkpoints and the offline tokenizer live (``$MEMOPT_CACHE`` or ``~/.cache/memopt``)."""
    return Path(os.environ.get("MEMOPT_CACHE", Path.home() / ".cache" / "memopt"))


@lru_cache(maxsize=1)
def hub_online(timeout_s: float = 3.0) -> bool:
    """Can we reach the Hugging Face hub? False when ``HF_HUB_OFFLINE``/``MEMOPT_OFFLINE`` is set."""
    for var in ("HF_HUB_OFFLINE", "MEMOPT_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def notice(msg: str) -> None:
    print(f"{NOTICE_PREFIX} {msg}", flush=True)


def local_checkpoint(name: str, dtype: torch.dtype | None = None) -> Path:
    """Path of the random-init checkpoint of ``name``; built (seed 0) and saved on first use.

    The 7B checkpoint is written in bf16 (13 GB on disk, ~14 GB of RAM to build):
    only build it on a machine that has that.
    """
    import hashlib
    sp = spec(name)
    dtype = dtype or (torch.bfloat16 if sp.name == "llama-7b" else torch.float32)
    # the folder names the config's hash: a changed config builds a new checkpoint instead of loading a stale one
    fields = {k: v for k, v in sp.make_config().to_dict().items() if k != "transformers_version"}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]
    path = cache_dir() / "checkpoints" / f"{name}-random-{str(dtype).replace('torch.', '')}-{digest}"
    if (path / "config.json").exists():
        return path
    from transformers import AutoModelForCausalLM
    notice(f"building a random-init {sp.about} checkpoint at {path} (first use only)")
    torch.manual_seed(0)
    # random init of 7B numbers takes minutes on a CPU and seconds on a GPU; the values do not matter
    build_on = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    with build_on:
        model = AutoModelForCausalLM.from_config(sp.make_config(), dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    try:
        tmp.rename(path)  # atomic: a concurrent builder either wins or finds a complete checkpoint
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve(name: str, hub_id: str | None = None) -> tuple[str, str]:
    """Where ``name`` will be loaded from: ``(path_or_id, "hub" | "local-random")``."""
    sp = spec(name)
    source = hub_id or sp.hub_id
    if source and hub_online():
        return source, "hub"
    return str(local_checkpoint(name)), "local-random"


class MaskDropout(torch.nn.Dropout):
    """``nn.Dropout`` that saves a 1-byte ``bool`` mask for backward on every device.

    On CUDA ``F.dropout`` already runs ``torch.native_dropout`` (a fused kernel that
    returns the output and a ``bool`` mask). On a CPU it draws a noise tensor in the
    input's dtype, multiplies, and autograd keeps that noise: 4 bytes per element in
    fp32 instead of 1. This module calls ``native_dropout`` everywhere, so the bytes
    kept for backward are CUDA's; the values follow the same rule (zero with
    probability ``p``, scale the rest by ``1 / (1 - p)``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.inplace:
            raise ValueError("MaskDropout does not support inplace=True (native_dropout returns a new tensor)")
        return torch.native_dropout(x, self.p, True)[0]


def match_cuda_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """Make a model keep for backward what it keeps on CUDA, on any device (idempotent).

    * every ``nn.Dropout`` becomes a :class:`MaskDropout` (same ``p``; 1-byte masks);
    * GPT-2's attention dropout is set to 0, so CPU ``scaled_dot_product_attention``
      takes its flash kernel (no stored attention matrix) -- CUDA's fused kernels keep
      no attention matrix with or without dropout, so on a GPU no byte changes.

    :func:`load_model` calls this; call it again after adding modules with their own
    dropout (``peft.get_peft_model`` adds ``lora_dropout``).
    """
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout and not child.inplace:
                swapped = MaskDropout(child.p)
                swapped.train(child.training)
                setattr(parent, name, swapped)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "gpt2":
        _set_gpt2_attention_dropout(model, 0.0)
    return model


def _set_gpt2_attention_dropout(model: torch.nn.Module, p: float) -> None:
    model.config.attn_pdrop = p
    for m in model.modules():
        if isinstance(getattr(m, "attn_dropout", None), torch.nn.Dropout):
            m.attn_dropout.p = p  # GPT-2's SDPA call reads attn_dropout.p; 0 -> the flash kernel on CPU too


def gpt2_layer_units(*, dropout: bool = True, kv_cache: bool = False) -> float:
    """What one GPT-2 block keeps for backward on CUDA, in units of ``batch x seq x hidden x 4`` bytes (fp32).

    ln_1 input 1 + ln_1 output 1 + q,k,v 3 + attention output 1 (fused SDPA keeps no
    ``seq x seq`` matrix) + ln_2 input 1 + ln_2 output 1 + MLP hidden 4 + ``gelu_new``'s
    saved intermediates 12 (``tanh`` output, ``0.5 x``, ``1 + tanh``: 4 each) + GELU output 4
    = 28, plus two 1-byte dropout masks (0.25 each) when dropout is on, plus 2 for a KV
    cache's copies of k and v. LayerNorm statistics and SDPA's log-sum-exp are per token,
    not per channel (< 0.1 unit).
    """
    return 28.0 + (0.5 if dropout else 0.0) + (2.0 if kv_cache else 0.0)


def load_model(name: str, *, hub_id: str | None = None, train: bool = True, **from_pretrained_kwargs):
    """Load a course model through ``AutoModelForCausalLM.from_pretrained``.

    Online: the hub checkpoint (``hub_id`` overrides the default id). Offline, or
    if the hub load fails: the local random-init checkpoint of the same shape,
    with a notice. ``train=True`` calls ``model.train()``: ``from_pretrained``
    returns eval mode, in which Hugging Face gradient checkpointing is silently off;
    it also turns the KV cache off (``config.use_cache = False``: a training
    forward would otherwise copy every layer's keys and values into a cache).
    Every model goes through :func:`match_cuda_kernels` (see the module docstring:
    what a CPU step keeps is then what a CUDA step keeps).
    Extra keyword arguments go to ``from_pretrained`` (``dtype``,
    ``quantization_config``, ``device_map``, ``attn_implementation``, config fields
    such as ``resid_pdrop``...). An explicit ``attn_pdrop`` is kept as given.
    """
    from transformers import AutoModelForCausalLM
    sp = spec(name)
    where, kind = resolve(name, hub_id)
    model = None
    if kind == "hub":
        try:
            model = AutoModelForCausalLM.from_pretrained(where, **from_pretrained_kwargs)
        except (OSError, ValueError) as err:  # gated, renamed, network dropped mid-way
            notice(f"could not load {where!r} from the hub ({type(err).__name__}: {str(err)[:120]}); "
                   "falling back to a local random-init checkpoint")
            where, kind = str(local_checkpoint(name)), "local-random"
    if model is None:
        if sp.hub_id or hub_id:
            notice(f"offline: {name} is a random-init local checkpoint of the same architecture ({where}); "
                   "memory depends on shapes, not values, but its text is gibberish")
        model = AutoModelForCausalLM.from_pretrained(where, **from_pretrained_kwargs)
    model.memopt_source = f"{kind}:{where}"
    name_the_loss(model)
    attn_pdrop = from_pretrained_kwargs.get("attn_pdrop")
    match_cuda_kernels(model)
    if attn_pdrop and sp.family == "gpt2":  # asked for: the CPU then keeps the attention matrices (math kernel)
        _set_gpt2_attention_dropout(model, attn_pdrop)
    if train:
        model.config.use_cache = False  # a KV cache is for generation; generate() reads generation_config
        model.train()
    return model


def name_the_loss(model):
    """Tell transformers the model is a causal LM (its loss is the one it would fall back to anyway).

    transformers finds a model's loss by its class name; "GPT2LMHeadModel" matches none, and it warns
    (``loss_type=None ... ForCausalLMLoss``) on the first forward with labels. Returns the model.
    """
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    return model


def from_config(config, **kwargs):
    """A random-init causal LM of ``config`` (``AutoModelForCausalLM.from_config``), its loss named."""
    from transformers import AutoModelForCausalLM
    return name_the_loss(AutoModelForCausalLM.from_config(config, **kwargs))


def meta_model(name: str):
    """The architecture on the ``meta`` device: shapes and byte counts, no memory, no weights."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(name))


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, counting shared (tied) tensors once.

    bitsandbytes ``Params4bit`` stores two 4-bit values per byte, so its
    ``numel()`` is half the logical count; the original shape is in ``quant_state.shape``.
    """
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        qs = getattr(p, "quant_state", None)
        n += int(torch.Size(qs.shape).numel()) if qs is not None else p.numel()
    return n
