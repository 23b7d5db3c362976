"""Where the model runs: the CPU (the default) or a CUDA GPU, chosen once at the edge.

`--device` on pretrain, simulate, generate, evaluate and bench, and `device:` in a site's YAML,
take one of DEVICES. "auto" takes the GPU when torch sees one and says which it took; "cuda"
without a GPU is an error, never a quiet run on the CPU.
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str, where: str = "--device") -> torch.device:
    """The torch device for `choice`; `where` names the flag or YAML field in the error."""
    if choice not in DEVICES:
        raise ValueError(f"{where} = {choice!r}; choose one of: {', '.join(DEVICES)}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{where} = 'cuda', but torch {torch.__version__} sees no CUDA GPU "
            f"(built for CUDA {torch.version.cuda or 'none: a CPU-only build'}); install a CUDA build of torch "
            "on a machine with a GPU, or choose 'cpu'"
        )
    return torch.device("cuda")


def describe(device: torch.device) -> str:
    """One line for logs and provenance: 'cpu' or 'cuda (NVIDIA H100 80GB HBM3)'."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
