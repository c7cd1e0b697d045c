"""Placement of the embedding and the lm_head: the two vocabulary-sized matrices a 4-bit load leaves alone.

What it saves
-------------
bitsandbytes quantizes the Linear layers *inside* the decoder blocks; the input embedding (``vocab x hidden``)
and the output head (``hidden -> vocab``) stay in the load dtype. At 7B that is 2 x 32000 x 4096 = 262 M
parameters, 0.49 GiB in bf16 -- 13 % of a 4-bit 7B's weights, 0.98 GiB once peft's
``prepare_model_for_kbit_training`` has upcast them to fp32. Frozen under LoRA, they need no precision beyond
what the forward uses. Three placements, each for one matrix:

* ``"bf16"``: cast back to bf16 (undoes the fp32 upcast; the compute dtype anyway). -2 bytes/param from fp32.
  The head then expects bf16 inputs: use it under autocast (``precision="amp"``) or in a bf16 model.
* ``"8bit"``: int8 codes plus one fp32 scale per row (bitsandbytes' ``int8_vectorwise_quant``, LLM.int8's
  row-wise absmax): 1 + 4/hidden bytes per parameter, half of bf16. The embedding looks its rows up in int8
  and scales only those; the head dequantizes its weight to the compute dtype for each pass (a transient bf16
  copy during the loss, freed after it). Cost: rounding of at most half a code step (absmax/254) per weight.
* ``"host"`` (embedding only): the table stays in host RAM; token ids go to the host, the looked-up rows
  (``batch x seq x hidden``) come back to the GPU. Frees the whole table on the device for one small copy per
  forward. The head cannot live on the host: its matmul over every token is the largest of the step.

``"keep"`` (the default) does nothing. A tied embedding/head (GPT-2) is one matrix: ``"keep"`` or ``"bf16"``
for both. Everything here is frozen: placement is for LoRA/QLoRA, where neither matrix trains.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EMBEDDING_PLACEMENTS = ("keep", "bf16", "8bit", "host")
HEAD_PLACEMENTS = ("keep", "bf16", "8bit")


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import bitsandbytes.functional as bnbf
    codes, scales, _ = bnbf.int8_vectorwise_quant(weight.detach().to(torch.float16))
    return codes, scales


class Int8Embedding(torch.nn.Module):
    """A frozen embedding stored as int8 rows and one fp32 absmax per row (LLM.int8's row-wise scheme)."""

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        codes, scales = _quantize_rows(embedding.weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.dtype = embedding.weight.dtype
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # only the looked-up rows are dequantized: (batch, seq, hidden), never the table
        rows = F.embedding(ids, self.codes).to(torch.float32)
        return (rows * (self.scales[ids] / 127.0).unsqueeze(-1)).to(self.dtype)


class Int8Head(torch.nn.Module):
    """A frozen, bias-free output head stored in int8 (row-wise absmax); dequantized for each pass."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        if head.bias is not None:
            raise ValueError("an 8-bit head supports bias-free lm_heads (GPT-2, Llama)")
        codes, scales = _quantize_rows(head.weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.dtype = head.weight.dtype
        self.in_features, self.out_features = head.in_features, head.out_features

    def dequantized_weight(self, rows_per_block: int = 2048) -> torch.Tensor:
        """The ``(vocab, hidden)`` weight in its original dtype: a transient tensor, freed by the caller.

        The same values as bitsandbytes' ``int8_vectorwise_dequant`` (``codes * scale / 127`` in fp32, then
        cast), computed ``rows_per_block`` rows at a time into the output: dequantizing the whole matrix at
        once would hold two fp32 copies (2 x 0.49 GiB at 7B) beside the result, at the step's peak.
        """
        out = torch.empty(self.codes.shape, dtype=self.dtype, device=self.codes.device)
        for i in range(0, self.codes.shape[0], rows_per_block):
            block = self.codes[i:i + rows_per_block] * self.scales[i:i + rows_per_block].view(-1, 1)
            out[i:i + rows_per_block] = block * 7.874015718698502e-3  # bitsandbytes' 1/127
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype))


class HostEmbedding(torch.nn.Module):
    """An embedding whose table lives in host memory; its output is moved to ``device``.

    ``moved_bytes`` counts what crossed the host link (token ids down, looked-up rows up), for a cost model.
    """

    def __init__(self, embedding: torch.nn.Embedding, device: torch.device | str):
        super().__init__()
        self.inner = self.to_host(embedding)
        self.device = torch.device(device)
        self.weight = self.inner.weight  # transformers reads get_input_embeddings().weight (dtype, tying checks)
        self.moved_bytes = 0

    def to_host(self, embedding: torch.nn.Embedding) -> torch.nn.Embedding:
        return embedding.to("cpu")

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``ids``, looked up on the host, copied to the device."""
        return self.inner(ids.to("cpu")).to(self.device, non_blocking=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.lookup(ids)
        self.moved_bytes += ids.numel() * ids.element_size() + out.numel() * out.element_size()
        return out


def _tied(model) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return head is not None and getattr(head, "weight", None) is getattr(emb, "weight", None)


def _set_head(model, module) -> None:
    if hasattr(model, "set_output_embeddings"):
        model.set_output_embeddings(module)
    else:  # pragma: no cover - every transformers causal LM has it
        model.lm_head = module


def place_vocab_matrices(model: torch.nn.Module, *, embedding: str = "keep", lm_head: str = "keep",
                         device: torch.device | str | None = None,
                         host_embedding: type = HostEmbedding) -> torch.nn.Module:
    """Apply a placement to the input embedding and the lm_head of a transformers causal LM; returns it.

    Call it on the base model *before* LoRA (peft wraps what it finds), after the model is frozen.
    ``device``: where the rest of the model runs (the host embedding sends its output there; default: the
    embedding's current device). ``host_embedding``: the :class:`HostEmbedding` class to use (the GPU
    predictor passes a subclass whose host tensors live outside its replayed GPU allocator).
    """
    if embedding not in EMBEDDING_PLACEMENTS:
        raise ValueError(f"embedding placement must be one of {EMBEDDING_PLACEMENTS}, got {embedding!r}")
    if lm_head not in HEAD_PLACEMENTS:
        raise ValueError(f"lm_head placement must be one of {HEAD_PLACEMENTS}, got {lm_head!r}"
                         + (" (a head on the host would run the step's largest matmul on the CPU)"
                            if lm_head == "host" else ""))
    if embedding == "keep" and lm_head == "keep":
        return model
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if _tied(model) and (embedding != lm_head or embedding in ("8bit", "host")):
        raise ValueError(f"{type(model).__name__} ties its embedding and lm_head (one matrix): 'keep' both or "
                         "make both 'bf16' (8-bit or host copies would untie them and store the matrix twice)")
    trainable = [n for n, p in list(emb.named_parameters()) + list(head.named_parameters()) if p.requires_grad]
    if embedding in ("8bit", "host") or lm_head == "8bit":
        if trainable:
            raise ValueError("8-bit and host placements are for frozen matrices; freeze the model first "
                             "(quantization/LoRA recipes do) or use 'bf16'")
    device = torch.device(device) if device is not None else emb.weight.device
    if embedding == "bf16" or lm_head == "bf16":
        for mod, how in ((emb, embedding), (head, lm_head)):
            if how == "bf16":
                mod.to(torch.bfloat16)
    if embedding == "8bit":
        model.set_input_embeddings(Int8Embedding(emb))
    elif embedding == "host":
        model.set_input_embeddings(host_embedding(emb, device))
    if lm_head == "8bit":
        _set_head(model, Int8Head(head))
    return model


def vocab_matrix_bytes(model: torch.nn.Module, device: torch.device | str) -> int:
    """Bytes the embedding and lm_head hold on ``device`` (parameters and buffers, each storage once)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    dev = torch.device(device)
    seen, total = set(), 0
    for m in (hf.get_input_embeddings(), hf.get_output_embeddings()):
        for t in list(m.parameters()) + list(m.buffers()):
            st = t.untyped_storage()
            if t.device.type == dev.type and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total
