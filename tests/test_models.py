"""Models load from the hub when online and from a same-shape local checkpoint offline -- never silently."""
import pytest

from memopt_lib import models
from memopt_lib.calculator import Shape, lora_params
from memopt_lib.text import corpus_text, load_tokenizer, padded_batch


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMOPT_OFFLINE", "1")
    models.hub_online.cache_clear()
    yield
    models.hub_online.cache_clear()


def test_offline_fallback_says_so(offline, capsys):
    m = models.load_model("gpt2")
    out = capsys.readouterr().out
    assert "[memopt] offline" in out and "random-init" in out
    assert m.memopt_source.startswith("local-random:")
    assert m.training  # from_pretrained returns eval mode; the course wants train mode
    assert models.count_parameters(m) == 124_439_808


def test_hub_failure_falls_back_with_notice(monkeypatch, capsys):
    import transformers
    monkeypatch.setattr(models, "hub_online", lambda: True)
    real = transformers.AutoModelForCausalLM.from_pretrained

    def fake(where, **kw):
        if "/" in str(where) and not str(where).startswith("/"):
            raise OSError("simulated: repository not reachable")
        return real(where, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    m = models.load_model("gpt2-tiny", hub_id="someone/gpt2-tiny")
    assert "falling back" in capsys.readouterr().out
    assert m.memopt_source.startswith("local-random:")


def test_same_architecture_offline_and_meta():
    for name in models.SPECS:
        meta = models.meta_model(name)
        assert models.count_parameters(meta) == Shape.from_config(models.model_config(name)).n_params


def test_lora_arithmetic_matches_the_course_numbers():
    llama = Shape.from_config(models.model_config("llama-7b"))
    assert lora_params(llama, 16, ("q_proj", "k_proj", "v_proj", "o_proj")) == 16_777_216
    assert lora_params(llama, 16, ("q_proj", "v_proj")) == 8_388_608
    gpt2 = Shape.from_config(models.model_config("gpt2"))
    assert lora_params(gpt2, 16, ("c_attn",)) == 589_824


def test_unknown_model_is_a_clear_error():
    with pytest.raises(KeyError, match="choose one of"):
        models.spec("llama-3.2-7b")


def test_offline_tokenizer_and_batches(offline):
    tok = load_tokenizer("gpt2-tiny")
    ids = tok(corpus_text("heldout")[:200])["input_ids"]
    assert 0 < max(ids) < models.LOCAL_VOCAB
    assert tok.decode(ids).startswith(corpus_text("heldout")[:50])
    b = padded_batch([5, 3], vocab_size=100)
    assert b["labels"][1, 3:].eq(-100).all() and b["attention_mask"].sum() == 8


def test_checkpoint_folder_follows_the_config(tmp_path, monkeypatch):
    """A changed config must build a new checkpoint, never load a stale one saved under the same name."""
    from memopt_lib import models
    monkeypatch.setenv("MEMOPT_CACHE", str(tmp_path))
    first = models.local_checkpoint("gpt2-tiny")
    assert first.parent == tmp_path / "checkpoints" and (first / "config.json").exists()
    old = models.SPECS["gpt2-tiny"]
    monkeypatch.setitem(models.SPECS, "gpt2-tiny", models.ModelSpec(
        old.name, old.family, old.hub_id, lambda: models._gpt2(n_layer=1, n_embd=64, n_head=2, n_positions=64,
                                                              vocab_size=models.LOCAL_VOCAB), old.about))
    second = models.local_checkpoint("gpt2-tiny")
    assert second != first
    assert models.load_model("gpt2-tiny").config.n_layer == 1


def test_llama_tiny_runs_4bit_inference_on_any_cpu():
    """bitsandbytes' packed AVX512-BF16 CPU path (eval mode, no grad) needs output widths divisible by 32."""
    import torch

    from memopt_lib import quantization as Q
    cfg = models.model_config("llama-tiny")
    assert cfg.hidden_size % 32 == 0 and cfg.intermediate_size % 32 == 0
    model = Q.load_quantized("llama-tiny", 4, "nf4", True, compute_dtype=torch.float32, dtype=torch.float32,
                             device=torch.device("cpu"))
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    logits, _ = Q.eval_logits(model, ids)
    assert logits.shape == (1, 16, cfg.vocab_size) and torch.isfinite(logits).all()
