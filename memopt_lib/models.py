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
``llama-tiny`` 4 layers, 256 wide, same architecture: the CPU stand-in for the 7B. Its MLP width is
               704 (2.75 x 256; the 7B's ratio is 2.69): bitsandbytes' packed CPU kernel for
               4-bit inference (AVX512-BF16 CPUs) needs output widths divisible by 32.
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


def load_model(name: str, *, hub_id: str | None = None, train: bool = True, **from_pretrained_kwargs):
    """Load a course model through ``AutoModelForCausalLM.from_pretrained``.

    Online: the hub checkpoint (``hub_id`` overrides the default id). Offline, or
    if the hub load fails: the local random-init checkpoint of the same shape,
    with a notice. ``train=True`` calls ``model.train()``: ``from_pretrained``
    returns eval mode, in which Hugging Face gradient checkpointing is silently off.
    Extra keyword arguments go to ``from_pretrained`` (``dtype``,
    ``quantization_config``, ``device_map``, ``attn_implementation``...).
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
    if getattr(model, "loss_type", "") is None:
        # transformers finds a model's loss by its class name; "GPT2LMHeadModel" matches none and it warns
        # on every first forward with labels. It is a causal LM: say so, the loss is the one it falls back to.
        model.loss_type = "ForCausalLM"
    if train:
        model.train()
    return model


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
