"""bitsandbytes on meta tensors: 4-bit weights (QLoRA) and 8-bit AdamW, byte for byte.

bitsandbytes' kernels need a GPU, and ``from_pretrained(..., quantization_config=...)`` needs real
weights to quantize, so the predictor builds the *result* of loading directly on the meta device, with
bitsandbytes' own classes (``bnb.nn.Linear4bit``, ``Params4bit``, ``QuantState``), so that peft wraps
them with its real 4-bit LoRA layer and bitsandbytes' own Python (``Linear4bit.forward``,
``MatMul4Bit``, ``dequantize_4bit``) runs on meta through its registered fake kernels. Modelled:

**4-bit storage** (``bnb.functional.quantize_4bit``, NF4, blocksize 64), per ``nn.Linear`` except
``lm_head`` (transformers keeps the output embedding unquantized):
  packed weight ``ceil(n/2)`` bytes (uint8, shape ``[ceil(n/2), 1]``); the 16-value NF4 code (fp32);
  without double quantization an fp32 ``absmax`` per 64-block (``n/64 x 4`` bytes); with it
  (``bnb_4bit_use_double_quant``) ``absmax`` is itself quantized to uint8 (``n/64`` bytes) in blocks of
  256 with an fp32 ``absmax`` per block, bitsandbytes' 256-value dynamic code (one, shared) and a
  scalar fp32 offset (``absmax.mean()``). Each tensor is its own allocation (rounded to 512 bytes).
**loading**, in module order: each weight arrives in the load dtype (bf16) on the GPU and is quantized
  there, the bf16 copy freed afterwards (so the segments the allocator reserves include those copies).
**the 4-bit matmul** (``bitsandbytes::gemm_4bit``, CUDA backend ``_dequant_linear_fallback``): above
  1536 input rows (every training shape of the course: batch x seq >= 2048) the kernel dequantizes the
  weight into a scratch tensor of the compute dtype (``N x K``; plus two fp32 ``absmax`` buffers with
  double quantization) that lives for the call. Between 5 and 1536 rows bitsandbytes picks per GPU and
  shape between that path and a custom kernel that needs no scratch (``_gemm_4bit_use_custom_cuda``,
  which needs a GPU to import); the predictor assumes the dequantize path there -- at most one
  dequantized weight (86 MiB at 7B) too much, never too little. At 4 rows or fewer: the custom kernel.
  ``MatMul4Bit`` saves only the packed weight for backward, which dequantizes again (bitsandbytes'
  Python, replayed as is).
**8-bit AdamW** (:class:`AdamW8bitStandIn`, after ``bnb.optim.Optimizer2State.init_state``): per
  parameter of at least 4096 elements two uint8 states of its shape and two fp32 ``absmax`` of
  ``ceil(n/256)`` blocks; smaller parameters get two fp32 states; two 256-value qmaps, shared. The update
  kernel works in place. Paged (``PagedAdamW8bit``): the states of tensors of at least 1e5 elements
  live in CUDA unified memory (``cudaMallocManaged``, ``Optimizer8bit.get_state_buffer``), outside the
  caching allocator, so they are not counted in ``allocated``; smaller ones (the 7B's 16 x 4096 LoRA
  matrices) stay ordinary device tensors.
"""
from __future__ import annotations

from ..offload_paged import PAGED_MIN_NUMEL

import torch

from .replay import register_scratch

BLOCK = 64          # NF4 blocksize (bnb_4bit default)
DQ_BLOCK = 256      # blocksize of the double quantization of absmax
CUSTOM_MAX_M = 1536  # bitsandbytes: dequant + F.linear beyond this many rows
CUSTOM_FLOOR_M = 4   # bitsandbytes: the custom kernel at or below this many rows

_shared: dict[str, torch.Tensor] = {}


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def quantize_to_4bit(model: torch.nn.Module, *, double_quant: bool, compute_dtype: torch.dtype, replay,
                     skip=("lm_head",)) -> torch.nn.Module:
    """Turn a meta model into what ``from_pretrained(load_in_4bit=True, nf4)`` leaves on the GPU."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    def load(t: torch.Tensor) -> torch.Tensor:  # the weight arriving on the GPU
        return torch.empty_like(t, device="meta")

    for mod_name, module in list(model.named_modules()):
        for pname, p in list(module.named_parameters(recurse=False)):
            full = f"{mod_name}.{pname}" if mod_name else pname
            is_linear = isinstance(module, torch.nn.Linear) and pname == "weight"
            if not is_linear or any(full.split(".")[0] == s or mod_name.endswith(s) for s in skip):
                p.data = load(p.data)
                continue
            out_f, in_f = p.shape
            n = p.numel()
            w = load(p.data)  # bf16 weight, freed once quantized
            packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device="meta")
            absmax = torch.empty(_blocks(n, BLOCK), dtype=torch.float32, device="meta")
            code = torch.empty(16, dtype=torch.float32, device="meta")
            state2 = offset = None
            if double_quant:
                offset = absmax.mean()
                centered = absmax - offset
                qabs = torch.empty(absmax.numel(), dtype=torch.uint8, device="meta")
                abs2 = torch.empty(_blocks(absmax.numel(), DQ_BLOCK), dtype=torch.float32, device="meta")
                if "dynamic" not in _shared or _shared["dynamic"].device.type != "meta":
                    _shared["dynamic"] = torch.empty(256, dtype=torch.float32, device="meta")
                state2 = QuantState(absmax=abs2, code=_shared["dynamic"], blocksize=DQ_BLOCK, dtype=torch.float32)
                del centered
                absmax = qabs
            qs = QuantState(absmax=absmax, shape=torch.Size([out_f, in_f]), code=code, blocksize=BLOCK,
                            quant_type="nf4", dtype=p.dtype, offset=offset, state2=state2)
            with replay.untracked(), torch.device("meta"):
                lin = bnb.nn.Linear4bit(in_f, out_f, bias=module.bias is not None, compute_dtype=compute_dtype,
                                        compress_statistics=double_quant, quant_type="nf4",
                                        quant_storage=torch.uint8, device="meta")
            lin.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, blocksize=BLOCK,
                                           compress_statistics=double_quant, quant_type="nf4",
                                           quant_storage=torch.uint8, module=lin, bnb_quantized=True)
            if module.bias is not None:
                lin.bias = torch.nn.Parameter(load(module.bias.data), requires_grad=False)
            del w
            parent = model.get_submodule(mod_name.rsplit(".", 1)[0]) if "." in mod_name else model
            setattr(parent, mod_name.rsplit(".", 1)[-1], lin)
        for bname, b in list(module.named_buffers(recurse=False)):
            module._buffers[bname] = load(b)
    model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; peft reads it
    return model


def _gemm_4bit_scratch(replay, args, kwargs):
    """Scratch of bitsandbytes' CUDA ``gemm_4bit`` on its dequantize + ``F.linear`` path."""
    A, B, shape_b, absmax = args[:4]
    K = A.shape[-1]
    M = A.numel() // K if K else 0
    if M <= CUSTOM_FLOOR_M:
        return []  # the custom kernel reads the packed weight directly
    tokens = []
    absmax_8bit = kwargs.get("absmax_8bit", args[7] if len(args) > 7 else None)
    if absmax_8bit is not None:
        tokens.append(replay.transient(absmax_8bit.numel() * 4))  # absmax_dq
        tokens.append(replay.transient(absmax_8bit.numel() * 4))  # absmax_dq + offset
    tokens.append(replay.transient(int(shape_b[0]) * int(shape_b[1]) * A.element_size()))  # B_dq
    return tokens


register_scratch("bitsandbytes::gemm_4bit", _gemm_4bit_scratch)


class AdamW8bitStandIn(torch.optim.Optimizer):
    """The memory of ``bnb.optim.AdamW8bit`` / ``PagedAdamW8bit`` on meta tensors (no arithmetic)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 min_8bit_size: int = 4096, paged: bool = False, replay=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self.paged = paged
        self.replay = replay
        self.qmaps: dict[str, torch.Tensor] = {}


    def _init_state(self, p, st):
        st["step"] = 0
        import contextlib
        paged = self.paged and self.replay is not None and p.numel() >= PAGED_MIN_NUMEL  # bnb's get_state_buffer pages only tensors at least this large
        where = self.replay.untracked() if paged else contextlib.nullcontext()
        if p.numel() < self.min_8bit_size:
            with where:  # small tensors: fp32 states
                st["state1"] = torch.zeros_like(p, dtype=torch.float32)
                st["state2"] = torch.zeros_like(p, dtype=torch.float32)
            return
        if not self.qmaps:
            self.qmaps = {k: torch.empty(256, dtype=torch.float32, device=p.device) for k in ("dynamic", "udynamic")}
        with where:
            st["state1"] = torch.zeros_like(p, dtype=torch.uint8)
            st["state2"] = torch.zeros_like(p, dtype=torch.uint8)
        st["qmap1"], st["qmap2"] = self.qmaps["dynamic"], self.qmaps["udynamic"]
        blocks = _blocks(p.numel(), 256)
        st["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        st["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    self._init_state(p, st)
                st["step"] += 1  # the update itself is one in-place kernel per tensor: no new memory
        return None


def _gemm_4bit_flops(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> int:
    """``A (M x K) @ dequantized B.T (K x N)``: 2 M N K, as for the ``F.linear`` it computes."""
    k = a_shape[-1]
    m = 1
    for d in a_shape[:-1]:
        m *= d
    return 2 * m * k * int(shape_b[0])


def flop_formulas() -> dict:
    """``FlopCounterMode(custom_mapping=...)`` entries for bitsandbytes' ops (FlopCounterMode knows aten's)."""
    return {torch.ops.bitsandbytes.gemm_4bit: _gemm_4bit_flops}  # keyed by op packet, as FlopCounterMode looks up
