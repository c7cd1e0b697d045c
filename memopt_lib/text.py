"""Training text and tokenizers that work with or without the internet.

The corpus is an excerpt of Shakespeare (public domain) shipped in
``memopt_lib/assets``; its last 10 % is held out for perplexity. Online, the
big models use their real tokenizers from the hub. Offline -- and always for
the tiny models -- a byte-level BPE tokenizer (GPT-2's algorithm) is trained
with ``tokenizers`` on the corpus in about a second and cached.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from .models import LOCAL_VOCAB, cache_dir, hub_online, notice, spec

CORPUS = Path(__file__).parent / "assets" / "tiny_shakespeare.txt"
HELDOUT_FRACTION = 0.1


def corpus_text(split: str = "train") -> str:
    """``"train"``: the first 90 % of the corpus; ``"heldout"``: the last 10 %; ``"all"``: everything."""
    text = CORPUS.read_text(encoding="utf-8")
    cut = int(len(text) * (1 - HELDOUT_FRACTION))
    if split == "train":
        return text[:cut]
    if split == "heldout":
        return text[cut:]
    if split == "all":
        return text
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")


@lru_cache(maxsize=None)
def local_tokenizer(vocab_size: int = LOCAL_VOCAB):
    """A byte-level BPE tokenizer trained on the training split (cached on disk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    path = cache_dir() / f"tokenizer-bpe-{vocab_size}.json"
    if path.exists():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus_text("train").split("\n\n"), trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{id(tok)}.tmp")
        tok.save(str(tmp))
        tmp.replace(path)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def load_tokenizer(model_name: str):
    """The real tokenizer of a hub model when online, else the local BPE tokenizer (with a notice)."""
    sp = spec(model_name)
    if sp.hub_id and hub_online():
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(sp.hub_id)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            return tok
        except (OSError, ValueError) as err:
            notice(f"tokenizer of {sp.hub_id} not available ({type(err).__name__}); using the local BPE tokenizer")
    elif sp.hub_id:
        notice(f"offline: using a {LOCAL_VOCAB}-token BPE tokenizer trained on the course corpus for {model_name}")
    return local_tokenizer()


def token_stream(tokenizer, split: str = "train") -> torch.Tensor:
    """The whole split as one 1-D tensor of token ids."""
    return torch.tensor(tokenizer(corpus_text(split))["input_ids"], dtype=torch.long)


def lm_batches(tokenizer, batch: int, seq: int, split: str = "train", seed: int = 0, device="cpu"):
    """Endless random windows of the corpus: ``{"input_ids", "labels"}``, shape ``(batch, seq)``.

    No ``attention_mask``: nothing is padded, and an all-ones mask only costs. transformers
    drops it again before attention (``masking_utils._ignore_causal_mask_sdpa``), after
    reading it back from the device (a host-device sync per forward on a GPU); where it
    cannot (tracing, ``torch.compile`` before torch 2.14) the mask is materialised and
    SDPA loses its flash kernel. Measured on CPU: the same bytes are saved with or
    without it. Padded batches (:func:`padded_batch`) carry a real mask.
    """
    ids = token_stream(tokenizer, split)
    if len(ids) <= seq + 1:
        raise ValueError(f"the {split} split has {len(ids)} tokens, too few for seq={seq}")
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq] for s in starts]).to(device)
        yield {"input_ids": x, "labels": x.clone()}


def random_batch(vocab_size: int, batch: int, seq: int, device="cpu", seed: int = 0) -> dict:
    """Random token ids used as their own labels: all a memory measurement needs (no padding, so no mask)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (batch, seq), generator=g).to(device)
    return {"input_ids": x, "labels": x.clone()}


def padded_batch(lengths: list[int], vocab_size: int, pad_id: int = 0, device="cpu", seed: int = 0) -> dict:
    """Right-padded sequences of the given lengths; padding is masked and labelled -100 (ignored by the loss)."""
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    x = torch.full((len(lengths), seq), pad_id, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randint(0, vocab_size, (n,), generator=g)
        mask[i, :n] = 1
    labels = x.masked_fill(mask == 0, -100)
    return {"input_ids": x.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
