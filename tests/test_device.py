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
        assert p.name == "cpu" and p.gpt2 == "gpt2-narrow" and "why" in p.describe()
    monkeypatch.setenv("MEMOPT_PROFILE", "cpu")
    assert pick_profile().name == "cpu"
    monkeypatch.setenv("MEMOPT_PROFILE", "tpu")
    with pytest.raises(ValueError, match="MEMOPT_PROFILE"):
        pick_profile()


def test_hardware_info_lists_libraries():
    info = dev.hardware_info("cpu")
    assert info.libraries["torch"] and "native bf16" in info.summary()


# ---------------------------------------------------------------- a Colab T4, simulated
T4_BYTES = 15_828_320_256  # about what torch reports for a Colab T4: 15 GB usable of its 16


@pytest.fixture
def simulated_t4(monkeypatch):
    """torch believes it sees one Tesla T4 (compute capability 7.5) that claims bf16 support."""
    from types import SimpleNamespace
    props = SimpleNamespace(name="Tesla T4", total_memory=T4_BYTES, major=7, minor=5)
    monkeypatch.delenv("MEMOPT_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: props.name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulated bf16 counts as "yes"
    return props


def test_t4_profile_is_fp16_with_a_grad_scaler_and_a_15_gb_card(simulated_t4):
    from memopt_lib.mixed_precision import PrecisionConfig
    from memopt_lib.qlora import compute_dtype_for
    prof = pick_profile()
    assert (prof.name, prof.device.type, prof.amp_dtype) == ("gpu", "cuda", torch.float16)
    assert "Tesla T4" in prof.describe() and "GradScaler" in prof.reason and "14.7 GiB" in prof.reason
    cfg = PrecisionConfig(mode="amp").resolved(prof.device)
    assert cfg.dtype == torch.float16 and cfg.needs_scaler  # make_scaler enables the GradScaler for it
    with pytest.raises(ValueError, match="no native bf16"):
        PrecisionConfig(mode="pure-bf16").resolved(prof.device)
    assert compute_dtype_for(prof.device) == torch.float16  # the capstone's QLoRA computes in fp16 there
    info = dev.hardware_info("cuda")
    assert (info.compute_capability, info.native_bf16, info.amp_dtype) == ("7.5", False, "float16")
    assert 15e9 < info.total_memory_bytes < 16e9  # the budget a T4 recipe must fit: 15 GB


def test_from_compute_capability_8_the_profile_is_bf16_without_a_scaler(simulated_t4, monkeypatch):
    from memopt_lib.mixed_precision import PrecisionConfig
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    simulated_t4.major, simulated_t4.minor, simulated_t4.name = 8, 0, "NVIDIA A100-SXM4-40GB"
    prof = pick_profile()
    assert prof.amp_dtype == torch.bfloat16 and "Native bf16" in prof.reason
    assert not PrecisionConfig(mode="amp").resolved(prof.device).needs_scaler
