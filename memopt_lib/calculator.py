"""Predict training memory by arithmetic, before measuring it.

The persistent state is exact arithmetic (the profiler confirms it to the byte):

* weights        = parameters x bytes per weight (4 fp32, 2 bf16, ~0.5 for 4-bit NF4)
* gradients      = *trainable* parameters x bytes per gradient
* optimizer      = AdamW: 2 states (exp_avg, exp_avg_sq) x trainable x 4 bytes, plus a
                   4-byte step counter per parameter tensor; 8-bit AdamW: 2 x 1 byte
                   (+ small per-block scales); SGD without momentum: 0

Activations are an *estimate* (they depend on kernels): per transformer layer,
Korthikanti et al. (2022) count ``s*b*h*(34 + 5*a*s/h)`` bytes with 16-bit
activations -- the second term is the attention matrix, which fused attention
(SDPA / flash) never stores. We scale the 2-byte part by the activation width.
The LM head adds the logits, ``b*s*vocab``, stored more than once (the logits,
their fp32 log-softmax for the loss, and their gradient). With gradient
checkpointing only each layer's input is kept, plus one layer recomputed at a
time. Compare with the profiler's measurement: the gap is the lesson.
"""
from __future__ import annotations

from dataclasses import dataclass

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "nf4": 0.5}
OPTIMIZER_STATES = {"adamw": 2, "adamw8bit": 2, "sgd": 0, "sgd-momentum": 1}
OPTIMIZER_STATE_BYTES = {"adamw": 4, "adamw8bit": 1, "sgd": 0, "sgd-momentum": 4}


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs to know about a decoder-only transformer."""

    n_params: int
    n_layers: int
    hidden: int
    heads: int
    vocab: int
    intermediate: int
    n_param_tensors: int
    linear_shapes: tuple[tuple[str, int, int], ...] = ()  # (module kind, d_in, d_out) per layer

    @classmethod
    def from_config(cls, cfg) -> "Shape":
        if getattr(cfg, "model_type", "") == "gpt2":
            h, L, V, P = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.n_positions
            inter = cfg.n_inner or 4 * h
            n = V * h + P * h + L * (4 * h * h + 4 * h + 2 * h * inter + inter + h + 4 * h) + 2 * h
            tensors = 2 + L * 12 + 2
            lin = (("c_attn", h, 3 * h), ("c_proj", h, h), ("c_fc", h, inter), ("mlp.c_proj", inter, h))
            return cls(n, L, h, cfg.n_head, V, inter, tensors, lin)
        h, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
        inter, kv = cfg.intermediate_size, cfg.num_key_value_heads * (h // cfg.num_attention_heads)
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
        head = 0 if cfg.tie_word_embeddings else V * h
        n = V * h + head + L * per_layer + h
        tensors = 1 + (0 if cfg.tie_word_embeddings else 1) + L * 9 + 1
        lin = (("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h),
               ("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h))
        return cls(n, L, h, cfg.num_attention_heads, V, inter, tensors, lin)


def lora_params(shape: Shape, rank: int, targets: tuple[str, ...]) -> int:
    """Trainable LoRA parameters: ``rank * (d_in + d_out)`` per adapted matrix per layer."""
    return shape.n_layers * sum(rank * (i + o) for kind, i, o in shape.linear_shapes if kind in targets)


def estimate(shape: Shape, *, batch: int, seq: int, weights: str = "fp32", activations: str = "fp32",
             optimizer: str = "adamw", lora_rank: int = 0, lora_targets: tuple[str, ...] = ("c_attn", "q_proj",
             "v_proj"), checkpointing: bool = False, fused_attention: bool = True) -> dict[str, float]:
    """Predicted bytes per category at the peak of a training step."""
    if weights not in BYTES or activations not in BYTES or optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"weights/activations in {list(BYTES)}, optimizer in {list(OPTIMIZER_STATES)}")
    trainable = lora_params(shape, lora_rank, lora_targets) if lora_rank else shape.n_params
    adapter_bytes = 4 * trainable if lora_rank else 0  # adapters stay fp32
    w = shape.n_params * BYTES[weights] + adapter_bytes
    grad_bytes = 4 if (lora_rank or weights == "fp32") else BYTES[weights]
    g = trainable * grad_bytes
    states = OPTIMIZER_STATES[optimizer]
    o = trainable * states * OPTIMIZER_STATE_BYTES[optimizer]
    if optimizer == "adamw":
        o += 4 * (shape.n_param_tensors if not lora_rank else 2 * shape.n_layers * len(lora_targets))
    s, b, h, a = seq, batch, shape.hidden, shape.heads
    scale = BYTES[activations] / 2
    per_layer = s * b * h * 34 * scale + (0 if fused_attention else 5 * a * s * s * b * scale)
    if checkpointing:
        acts = shape.n_layers * s * b * h * BYTES[activations] + per_layer
    else:
        acts = shape.n_layers * per_layer
    logits = b * s * shape.vocab * (BYTES[activations] + 4 + 4)  # logits, fp32 log-softmax, its gradient
    return {"weights": w, "gradients": g, "optimizer": o, "activations": acts, "temporaries": logits}


def full_finetune_table(name: str = "llama-7b", batch: int = 8, seq: int = 2048) -> dict[str, float]:
    """The seed's "Llama 7B full fine-tuning" table, recomputed from the model's config (no weights)."""
    from .models import count_parameters, meta_model, model_config
    shape = Shape.from_config(model_config(name))
    exact = count_parameters(meta_model(name))
    if exact != shape.n_params:
        raise AssertionError(f"calculator counts {shape.n_params:,} parameters, the meta model {exact:,}")
    return estimate(shape, batch=batch, seq=seq, weights="fp32", activations="fp32", checkpointing=False)


PRECISIONS = {"fp32": ("fp32", "fp32"), "autocast bf16": ("fp32", "bf16"), "pure bf16": ("bf16", "bf16"),
              "4-bit weights": ("nf4", "bf16")}
RECIPE_PRECISION = {"fp32": "fp32", "autocast bf16": "amp", "pure bf16": "pure-bf16", "4-bit weights": "amp"}
RECIPE_OPTIMIZER = {"adamw": "adamw", "adamw8bit": "adamw_8bit"}


def predicted_breakdown(gpu: str, model: str, *, batch: int, seq: int, precision: str = "fp32",
                        optimizer: str = "adamw", lora_rank: int = 0, checkpointing: bool = False) -> dict[str, float]:
    """The same categories as :func:`estimate`, from the GPU-peak predictor (:mod:`memopt_lib.predict`).

    The calculator's settings become a :class:`~memopt_lib.recipe.Recipe` and one training step of it is
    replayed on meta tensors with ``gpu``'s kernels and caching allocator. The predictor's LoRA is rank 16
    on the default targets (any ``lora_rank > 0``); "4-bit weights" is the QLoRA default stack (NF4 with
    double quantization, ``prepare_model_for_kbit_training``, LoRA). cuBLAS workspaces count as temporaries.
    """
    from .bench import Row
    from .predict import predict_step
    from .recipe import Recipe
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if optimizer not in RECIPE_OPTIMIZER:
        raise ValueError(f"the predictor models {sorted(RECIPE_OPTIMIZER)}, not {optimizer!r}: use the arithmetic")
    quant = precision == "4-bit weights"
    recipe = Recipe(name="calculator", precision=RECIPE_PRECISION[precision], quantization="nf4-dq" if quant else "",
                    prepare="peft" if quant else "lean", lora_rank=16 if (lora_rank or quant) else 0,
                    checkpointing=checkpointing, optimizer=RECIPE_OPTIMIZER[optimizer])
    p = predict_step(gpu, model, batch, seq, Row("calculator", recipe))
    out = {k: float(v) for k, v in p["breakdown_bytes"].items() if k != "workspaces"}
    out["temporaries"] = out.get("temporaries", 0.0) + float(p["breakdown_bytes"].get("workspaces", 0))
    return out


def calculator_widget():
    """ipywidgets sliders that redraw the predicted breakdown: by arithmetic, or by the GPU-peak predictor."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from .models import model_config
    from .predict.gpus import GPUS

    models = {"GPT-2 124M": "gpt2", "Llama-2-7B": "llama-7b"}
    ui = dict(method=w.Dropdown(options=["arithmetic"] + [f"predictor: {g}" for g in sorted(GPUS)],
                                description="method"),
              model=w.Dropdown(options=list(models), description="model"),
              batch=w.IntSlider(8, 1, 64, description="batch"),
              seq=w.IntSlider(512, 64, 4096, step=64, description="seq len"),
              precision=w.Dropdown(options=list(PRECISIONS), description="precision"),
              optimizer=w.Dropdown(options=list(OPTIMIZER_STATES), description="optimizer"),
              lora_rank=w.IntSlider(0, 0, 128, description="LoRA rank"),
              checkpointing=w.Checkbox(False, description="checkpointing"))

    def draw(method, model, batch, seq, precision, optimizer, lora_rank, checkpointing):
        if method == "arithmetic":
            shape = Shape.from_config(model_config(models[model]))
            weights, acts = PRECISIONS[precision]
            est = estimate(shape, batch=batch, seq=seq, weights=weights, activations=acts,
                           optimizer=optimizer, lora_rank=lora_rank, checkpointing=checkpointing)
        else:
            try:
                est = predicted_breakdown(method.split(": ")[1], models[model], batch=batch, seq=seq,
                                          precision=precision, optimizer=optimizer, lora_rank=lora_rank,
                                          checkpointing=checkpointing)
            except ValueError as err:  # a setting the predictor does not model, or one a recipe refuses
                print(err)
                return
        plot_estimate(est, title=f"{model}: {method}, {sum(est.values()) / 1024**3:.1f} GiB")
        plt.show()

    return w.interactive(draw, **ui)


def plot_estimate(est: dict[str, float], ax=None, title: str = ""):
    import matplotlib.pyplot as plt

    from .profiler.plot import CATEGORY_COLORS
    ax = ax or plt.subplots(figsize=(6, 1.8))[1]
    left = 0.0
    for cat, val in est.items():
        ax.barh([0], [val / 1024**3], left=left, color=CATEGORY_COLORS.get(cat), label=cat)
        left += val / 1024**3
    ax.set_yticks([])
    ax.set_xlabel("GiB")
    ax.set_title(title or f"predicted {left:.2f} GiB")
    ax.legend(ncol=5, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    return ax
