"""A learner sees no library warnings: lab 01's solution runs in a Jupyter kernel and prints none.

Warnings are fixed where they start (the configs and models the kit builds: ``models.gpt2_config``
keeps special token ids inside the vocabulary, ``load_model`` names the causal-LM loss), never
filtered, so this test reads everything the notebook shows, stderr included.
"""
import os
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
WARNING = re.compile(r"\[transformers\]|Warning\b|warnings\.warn|FutureWarning|DeprecationWarning", re.I)


def _stream_text(nb):
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                yield cell.id, out.get("name"), out.get("text", "")


@pytest.mark.slow
def test_lab01_solution_prints_no_library_warning(tmp_path):
    from nbclient import NotebookClient
    nb = nbformat.read(str(ROOT / "solutions" / "01_memory_anatomy.ipynb"), as_version=4)
    env_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    os.environ["PYTHONPATH"] = env_path  # the kernel inherits it, as under nbval
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    shown = list(_stream_text(nb))
    assert any("peak allocated" in text for _, _, text in shown), "the notebook did not run its measurement"
    noisy = [(cid, line) for cid, _, text in shown for line in text.splitlines() if WARNING.search(line)]
    assert not noisy, f"warnings shown to the learner: {noisy[:5]}"


def test_small_gpt2_configs_keep_special_tokens_in_the_vocabulary(caplog):
    from memopt_lib.models import gpt2_config
    small = gpt2_config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)
    assert small.bos_token_id == small.eos_token_id == 0
    assert gpt2_config().eos_token_id == 50256  # the real GPT-2 keeps <|endoftext|> at 50256
    assert gpt2_config(vocab_size=300, eos_token_id=7).eos_token_id == 7


def test_loaded_gpt2_names_its_loss_and_warns_nothing(capfd):
    import torch
    from transformers.utils import logging as hf_logging

    from memopt_lib.models import load_model
    model = load_model("gpt2-tiny")
    capfd.readouterr()
    hf_logging.get_logger("transformers.modeling_utils").warning_once.cache_clear()
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    loss = model(input_ids=ids, labels=ids).loss
    assert model.loss_type == "ForCausalLM" and torch.isfinite(loss)
    assert "loss_type" not in capfd.readouterr().err
