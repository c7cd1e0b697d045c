"""Sharding model states across ranks: DDP, ZeRO-1/2/3 and FSDP2, predicted per rank.

Training with AdamW keeps, for every parameter, the weights, a gradient and two
optimizer moments: 16 bytes in fp32, whatever the batch. Data parallelism (DDP)
gives every rank a full copy of all of it, so adding GPUs adds throughput but
not room. ZeRO (Rajbhandari et al., 2020) removes the copies, stage by stage:

* **ZeRO-1** shards the optimizer state (and, in mixed precision, the fp32 master
  weights it updates): each of ``N`` ranks updates ``1/N`` of the parameters;
* **ZeRO-2** also shards the gradients (a reduce-scatter instead of an all-reduce
  leaves each rank only the gradient slice its optimizer shard needs);
* **ZeRO-3** also shards the parameters: a layer's weights are all-gathered just
  before its forward (and again for its backward) and freed right after. PyTorch's
  FSDP2 (``torch.distributed.fsdp.fully_shard``) is ZeRO-3: every parameter is a
  ``DTensor`` sharded on dim 0, and each ``fully_shard``-ed module is one unit
  gathered at a time.

Per rank, with ``P`` parameters and ``b_*`` bytes per parameter of each state::

    DDP     b_params P + b_grads P + b_opt P
    ZeRO-1  b_params P + b_grads P + b_opt P / N
    ZeRO-2  b_params P + (b_grads + b_opt) P / N
    ZeRO-3  (b_params + b_grads + b_opt) P / N  + the gathered unit in flight

What it costs: communication. DDP all-reduces the gradients once per step (2P
elements moved); ZeRO-1/2 the same volume; ZeRO-3 adds an all-gather of the
weights in the forward and again in the backward (3P), and waits on it unless
the next unit is prefetched. **CPU offload** (ZeRO-Offload / FSDP2's
``CPUOffloadPolicy``) moves the sharded states to host memory and runs the
optimizer step there: the GPU keeps little more than the unit in flight, and the
step waits on PCIe.

Mixed precision changes the bytes per state, not the rules. :data:`RECIPES` says
where each recipe keeps what; the kit and DeepSpeed's estimators differ only in
the recipe (see :func:`deepspeed_gpu_bytes`, tested against
``deepspeed.runtime.zero``'s own functions in ``tests/test_sharding.py``):

* the ZeRO paper counts ``2 + 2 + 12`` bytes (bf16 weights and gradients, fp32
  master and moments): ``"bf16-mixed"``;
* DeepSpeed's estimators also count an fp32 copy of the gradient partition that its
  optimizer reads (``18 = 2 grads16 + 4 grads32 + 4 params32 + 8 optimizer`` in
  ``estimate_zero2_model_states_mem_needs``): ``"deepspeed-bf16"``; under ZeRO-3
  the 16-bit gradients exist only for the layer in flight (its ``4 x
  largest_layer_params`` term: gathered 16-bit weights and their gradient);
* FSDP2 with ``MixedPrecisionPolicy(param_dtype=bf16)`` keeps the *sharded*
  parameters, gradients and moments in fp32 (the shard is the master) and casts
  only the gathered copy to bf16: at rest exactly the fp32 recipe, ``16 P / N``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
OFFLOADS = ("none", "optimizer", "params")
# which states each strategy divides by N (a state not listed is replicated on every rank)
SHARDED = {"ddp": (), "zero1": ("master", "optimizer", "grads_fp32"),
           "zero2": ("master", "optimizer", "grads_fp32", "grads"),
           "zero3": ("master", "optimizer", "grads_fp32", "grads", "params")}
# where a state is counted by the tracker: weights / gradients / optimizer
CATEGORY = {"params": "weights", "grads": "gradients", "grads_fp32": "gradients", "master": "optimizer",
            "optimizer": "optimizer"}
# what each offload moves to the host (ZeRO-Offload: the optimizer's side; ZeRO-Infinity / FSDP2's
# CPUOffloadPolicy: every sharded state)
OFFLOADED = {"none": (), "optimizer": ("master", "optimizer", "grads_fp32", "grads"),
             "params": ("master", "optimizer", "grads_fp32", "grads", "params")}


@dataclass(frozen=True)
class StateRecipe:
    """Bytes per parameter of each model state, and of the unit gathered for compute.

    ``grads_fp32``: an fp32 copy of the gradient that the optimizer reads (DeepSpeed keeps
    one per partition). ``gathered``: bytes per parameter of the unit in flight under ZeRO-3
    (its unsharded weights and their gradient, in the compute dtype).
    """

    name: str
    params: float
    master: float
    grads: float
    grads_fp32: float
    optimizer: float
    gathered: float

    def __post_init__(self):
        if min(self.params, self.master, self.grads, self.grads_fp32, self.optimizer, self.gathered) < 0:
            raise ValueError(f"recipe {self.name!r}: bytes per parameter cannot be negative")

    @property
    def total(self) -> float:
        return self.params + self.master + self.grads + self.grads_fp32 + self.optimizer


RECIPES = {
    "fp32": StateRecipe("fp32", 4, 0, 4, 0, 8, 8),
    "bf16-mixed": StateRecipe("bf16-mixed", 2, 4, 2, 0, 8, 4),
    "deepspeed-bf16": StateRecipe("deepspeed-bf16", 2, 4, 2, 4, 8, 4),
    # FSDP2 + MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 shards, bf16 gathered copy
    "fsdp2-bf16": StateRecipe("fsdp2-bf16", 4, 0, 4, 0, 8, 4),
}


def recipe(name: str | StateRecipe) -> StateRecipe:
    if isinstance(name, StateRecipe):
        return name
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)} or pass a StateRecipe") from None


def _check(n_params, strategy, world_size, offload):
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} (FSDP2 full sharding is 'zero3'), got {strategy!r}")
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    if offload == "params" and strategy != "zero3":
        raise ValueError("offload='params' moves sharded parameters to the host: only ZeRO-3 / FSDP2 shards them")
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size is a number of ranks (>= 1), got {world_size!r}")
    if n_params < 0:
        raise ValueError(f"n_params must be >= 0, got {n_params}")


def per_rank_bytes(n_params: int, strategy: str, world_size: int, *, recipe_name: str | StateRecipe = "fp32",
                   offload: str = "none", largest_unit_params: int = 0) -> dict[str, dict[str, float]]:
    """Bytes one rank holds, ``{"gpu": {...}, "cpu": {...}}``, each split into weights / gradients /
    optimizer (and ``gathered`` on the GPU: the ZeRO-3 unit in flight, ``largest_unit_params`` x
    ``recipe.gathered``).

    Shards are ``P / N`` exactly (DeepSpeed flattens and splits; FSDP2 pads each tensor's dim 0
    to a multiple of ``N``, a few rows at most: :func:`fsdp2_padded_numel`).
    """
    _check(n_params, strategy, world_size, offload)
    r = recipe(recipe_name)
    out = {"gpu": dict.fromkeys(("weights", "gradients", "optimizer", "gathered"), 0.0),
           "cpu": dict.fromkeys(("weights", "gradients", "optimizer"), 0.0)}
    for state in ("params", "master", "grads", "grads_fp32", "optimizer"):
        b = getattr(r, state)
        if strategy == "zero3" and state == "grads" and r.grads_fp32:
            continue  # reduced straight into the fp32 partition: only the unit in flight has one
        sharded = state in SHARDED[strategy]
        where = "cpu" if (sharded and state in OFFLOADED[offload]) else "gpu"
        out[where][CATEGORY[state]] += b * n_params / (world_size if sharded else 1)
    if strategy == "zero3":
        out["gpu"]["gathered"] = r.gathered * largest_unit_params
    return out


def gpu_total(n_params: int, strategy: str, world_size: int, **kw) -> float:
    """Total GPU bytes of :func:`per_rank_bytes` (model states + the gathered unit)."""
    return sum(per_rank_bytes(n_params, strategy, world_size, **kw)["gpu"].values())


def reduction_factor(strategy: str, world_size: int, recipe_name: str | StateRecipe = "fp32") -> float:
    """How many times fewer model-state bytes a rank holds than under DDP (gathered unit left out)."""
    ddp = gpu_total(1_000_000, "ddp", 1, recipe_name=recipe_name)
    kw = dict(recipe_name=recipe_name, largest_unit_params=0)
    return ddp / gpu_total(1_000_000, strategy, world_size, **kw)


def fsdp2_padded_numel(shape, world_size: int) -> int:
    """Elements of one rank's FSDP2 shard storage of a tensor: dim 0 split in ``ceil(d0 / N)`` rows.

    FSDP2 (``torch.chunk`` on dim 0) gives every rank a padded shard of the same size, so the
    all-gather is one flat copy; the last ranks' padding rows hold no parameters.
    """
    shape = tuple(int(s) for s in shape) or (1,)
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:])


def fsdp2_local_numel(shape, world_size: int, rank: int) -> int:
    """Elements of a tensor that rank ``rank`` really holds (``torch.chunk`` rows; the padding excluded).

    AdamW's moments are created like the local shard (``zeros_like``), so they are this size, not
    the padded one: the last rank's moments can be a row smaller than its weights' storage.
    """
    shape = tuple(int(s) for s in shape) or (1,)
    chunk = math.ceil(shape[0] / world_size)
    return max(0, min(chunk, shape[0] - rank * chunk)) * math.prod(shape[1:])


def largest_layer_params(model) -> int:
    """Parameters owned directly by the largest module (DeepSpeed's ``model_to_params`` definition).

    For GPT-2 that is the token embedding (``vocab x hidden``), which the LM head shares.
    """
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def count_unique_params(model) -> int:
    """Parameters, tied tensors once (what DeepSpeed's ``model_to_params`` counts)."""
    return sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())


# ------------------------------------------------------------------ DeepSpeed's view of the same arithmetic

def deepspeed_gpu_bytes(n_params: int, stage: int, world_size: int, *, offload: str = "none",
                        largest_layer: int = 0) -> float:
    """The kit's prediction in DeepSpeed's recipe: what ``estimate_zero{2,3}_model_states_mem_needs``
    call per-GPU memory (``offload="optimizer"``: ``offload_optimizer=cpu``; ``"params"``: also
    ``offload_param=cpu``). Derived from :func:`per_rank_bytes`, not copied from DeepSpeed."""
    if stage not in (2, 3):
        raise ValueError("DeepSpeed's estimators cover stages 2 and 3")
    return gpu_total(n_params, f"zero{stage}", world_size, recipe_name="deepspeed-bf16", offload=offload,
                     largest_unit_params=largest_layer)


def deepspeed_estimates(n_params: int, world_size: int, largest_layer: int, num_nodes: int = 1) -> dict | None:
    """DeepSpeed's own per-GPU numbers (``None`` without ``deepspeed``: ``pip install memopt[distributed]``).

    Keys ``(stage, offload)``; ZeRO-3 rows with ``zero_init=True`` (its GPU number does not depend on it).
    """
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        return None
    if world_size % num_nodes:
        raise ValueError(f"{world_size} GPUs do not split evenly over {num_nodes} nodes")
    per_node = world_size // num_nodes
    out = {}
    for off in ("none", "optimizer"):
        _, gpu = estimate_zero2_model_states_mem_needs(n_params, per_node, num_nodes, cpu_offload=off != "none")
        out[(2, off)] = gpu
    for off, (opt, par) in {"none": (False, False), "optimizer": (True, False), "params": (True, True)}.items():
        _, gpu, _ = estimate_zero3_model_states_mem_needs(n_params, largest_layer, per_node, num_nodes,
                                                          cpu_offload=opt, cpu_offload_params=par)
        out[(3, off)] = gpu
    return out


# ------------------------------------------------------------------ how many GPUs

GPUS_GB = {"T4": 16, "A100-40GB": 40, "A100-80GB": 80, "H100-80GB": 80}  # vendors' capacities, 1e9 bytes


def min_gpus(n_params: int, strategy: str, gpu_bytes: float, *, recipe_name: str | StateRecipe = "bf16-mixed",
             offload: str = "none", largest_unit_params: int = 0, reserve_bytes: float = 0.0,
             max_gpus: int = 4096) -> int | None:
    """The fewest ranks whose per-rank GPU bytes (+ ``reserve_bytes`` for activations, buffers,
    the CUDA context) fit in ``gpu_bytes``; ``None`` when no number does (what is replicated
    alone is too big: adding GPUs does not help DDP)."""
    def fits(n):
        return gpu_total(n_params, strategy, n, recipe_name=recipe_name, offload=offload,
                         largest_unit_params=largest_unit_params) + reserve_bytes <= gpu_bytes
    if not fits(max_gpus):
        return None
    lo, hi = 1, max_gpus  # per-rank bytes fall as n grows: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo


LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)


def llama_shape(name: str):
    """The calculator's :class:`~memopt_lib.calculator.Shape` of ``"llama-7b"`` or ``"llama-70b"`` (no weights)."""
    from transformers import LlamaConfig

    from .calculator import Shape
    from .models import model_config
    if name == "llama-70b":
        return Shape.from_config(LlamaConfig(**LLAMA_70B))
    return Shape.from_config(model_config(name))


def largest_layer_of(shape) -> int:
    """DeepSpeed's largest layer of a Llama shape: the embedding or the LM head, ``vocab x hidden``
    (larger than any one linear of a layer: checked in the tests against the meta model)."""
    biggest_linear = max(i * o for _, i, o in shape.linear_shapes)
    return max(shape.vocab * shape.hidden, biggest_linear)
