"""Second condition mode: embed prompts with a frozen transformers text model from a local folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.conditions import CONDITION_VECTOR, Conditions, Modality, Pathology
from common.prompts import describe


def vector_to_conditions(vector: torch.Tensor) -> Conditions:
    """[7] tensor laid out as CONDITION_VECTOR (NaN = unknown) -> Conditions."""
    # Rounded to 6 decimals: the vector is float32, so 0.3 T comes back as 0.30000001.
    values = {name: round(float(v), 6) for name, v in zip(CONDITION_VECTOR, vector.tolist(), strict=True)}
    known = {k: v for k, v in values.items() if not math.isnan(v)}
    if "modality" in known:
        known["modality"] = list(Modality)[int(known["modality"])]  # type: ignore[assignment]
    if "pathology" in known:
        known["pathology"] = list(Pathology)[int(known["pathology"])]  # type: ignore[assignment]
    return Conditions(**known)  # type: ignore[arg-type]


class TextConditionEncoder(nn.Module):
    """Tokens [B, L, dim] from a frozen local text model (e.g. CLIP) plus a trainable projection.

    A condition vector is first written as its canonical prompt (common.prompts.describe), so
    attribute dropping for classifier-free guidance works as in the structured mode; free text
    can be passed directly with `encode_text`. Nothing is downloaded: the model loads with
    local_files_only=True. The text model is frozen and kept outside the module's parameters,
    so it is neither federated nor saved with the fine-tuned weights.
    """

    text_model: Any  # the frozen transformers model (set without registering it)

    def __init__(self, text_model_dir: str | Path, dim: int, max_length: int = 32) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        folder = Path(text_model_dir)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(
                f"{folder / 'config.json'}: missing; text_model_dir must be a local transformers model folder"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        text_model = getattr(model, "text_model", model).eval().requires_grad_(False)
        object.__setattr__(self, "text_model", text_model)  # not a registered submodule
        self.max_length = max_length
        self.project = nn.Linear(text_model.config.hidden_size, dim)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            hidden = self.text_model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).last_hidden_state
        return self.project(hidden)  # -> [B, L, dim]

    def forward(self, conditions: torch.Tensor) -> torch.Tensor:
        return self.encode_text([describe(vector_to_conditions(row)) for row in conditions])
