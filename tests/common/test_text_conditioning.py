"""The text-model condition mode, with a tiny random CLIP text model the test saves itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from common.conditioning import unconditional
from common.prompts import conditions_to_vector, parse_prompt
from common.text_conditioning import TextConditionEncoder, vector_to_conditions


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-clip")
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.-'")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


def test_vector_round_trip() -> None:
    c = parse_prompt("axial FLAIR at 0.3T with glioma, TR 9000 ms")
    assert vector_to_conditions(conditions_to_vector(c)) == c


def test_text_encoder_embeds_prompts_and_conditions(tiny_clip: Path) -> None:
    encoder = TextConditionEncoder(tiny_clip, dim=16, max_length=24)
    flair = conditions_to_vector(parse_prompt("FLAIR at 0.3T with glioma"))
    t1 = conditions_to_vector(parse_prompt("T1w at 3T"))
    tokens = encoder(torch.stack([flair, t1, unconditional(1)[0]]))
    assert tokens.shape == (3, 24, 16)
    assert not torch.allclose(tokens[0], tokens[1])
    # Only the projection trains; the text model is frozen and not a parameter of the module.
    assert {n for n, p in encoder.named_parameters()} == {"project.weight", "project.bias"}
    free_text = encoder.encode_text(["a brain scan of an elderly patient"])
    assert free_text.shape == (1, 24, 16)


def test_missing_text_model_folder_is_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="local transformers model folder"):
        TextConditionEncoder(tmp_path, dim=16)
