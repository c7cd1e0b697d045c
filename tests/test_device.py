import pytest
import torch

from memopt_lib import device as dev
from memopt_lib.profiles import pick_profile


@pytest.mark.parametrize("cap,native", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_rule_is_the_capability(monkeypatch, cap, native):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 may claim
    assert dev.has_native_bf16("cuda") is native
    assert dev.amp_dtype("cuda") == (torch.bfloat16 if native else torch.float16)


def test_cpu_profile_and_override(monkeypatch):
    monkeypatch.delenv("MEMOPT_PROFILE", raising=False)
    if not torch.cuda.is_available():
        p = pick_profile()
        assert p.name == "cpu" and p.gpt2 == "gpt2" and "why" in p.describe()
    monkeypatch.setenv("MEMOPT_PROFILE", "cpu")
    assert pick_profile().name == "cpu"
    monkeypatch.setenv("MEMOPT_PROFILE", "tpu")
    with pytest.raises(ValueError, match="MEMOPT_PROFILE"):
        pick_profile()


def test_hardware_info_lists_libraries():
    info = dev.hardware_info("cpu")
    assert info.libraries["torch"] and "native bf16" in info.summary()
