"""--device and `device:`: cpu by default, a GPU only when asked for and present, never a quiet fallback."""

from __future__ import annotations

import pytest
import torch

from common.device import describe, resolve_device
from common.run_config import RunConfig

NO_GPU = not torch.cuda.is_available()


def test_cpu_and_auto_without_a_gpu_are_the_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert describe(torch.device("cpu")) == "cpu"


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_an_error_naming_the_field() -> None:
    with pytest.raises(RuntimeError, match=r"site\.yaml: device = 'cuda', but torch .* sees no CUDA GPU"):
        resolve_device("cuda", "site.yaml: device")


def test_an_unknown_device_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"--device = 'gpu'; choose one of: auto, cpu, cuda"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match=r"run config 'device' = 'gpu'"):
        RunConfig(device="gpu")
