"""fedmri's evaluator network: MRI features for the Fréchet distance and three condition classifiers.

Inception weights cannot be downloaded here, and ImageNet features say little about MRI
contrast, so fedmri trains its own small CNN on public labelled reference slices
(`sites/hospitals/reference/`, never seen by the base model or any hospital) and ships it
beside the base model with the same kind of provenance (`fedmri train-evaluator`).

- `features(x)`: the 64-d global-average-pooled activations, the space in which the Fréchet
  distance is computed (as FID uses Inception's pool features, Heusel et al. 2017, §3).
- three heads on those features: modality (5 contrasts), pathology (4 labels) and field
  strength (0.3 / 1.5 / 3 T, the nearest in log-tesla), trained jointly with cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.conditions import Modality, Pathology
from common.fit import fit
from common.randomize import randomize
from common.weights import load_network, save_network, shipped_dir

NAME = "fedmri-eval-v2"
EVALUATOR_DIR = Path(__file__).parent / "weights" / NAME
WEIGHTS = "evaluator.safetensors"
FIELD_CLASSES = (0.3, 1.5, 3.0)  # tesla
HEADS = {"modality": len(Modality), "pathology": len(Pathology), "field": len(FIELD_CLASSES)}


def field_class(tesla: np.ndarray) -> np.ndarray:
    """Index of the nearest of FIELD_CLASSES in log-tesla (0.5 T -> 0.3 T, 1 T -> 1.5 T)."""
    logs = np.log(np.asarray(FIELD_CLASSES))
    return np.abs(np.log(np.asarray(tesla, dtype=np.float64))[..., None] - logs).argmin(-1)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class EvaluatorNet(nn.Module):
    """[B, 1, 64, 64] in [0, 1] -> features [B, F] and logits per head. About 0.2M parameters."""

    def __init__(self, width: int = 16, features: int = 64) -> None:
        super().__init__()
        self.feature_dim = features
        w = width
        self.trunk = nn.Sequential(
            _block(1, w, 1), _block(w, w, 2),  # -> [B, w, 32, 32]
            _block(w, 2 * w, 1), _block(2 * w, 2 * w, 2),  # -> [B, 2w, 16, 16]
            _block(2 * w, 4 * w, 1), _block(4 * w, 4 * w, 2),  # -> [B, 4w, 8, 8]
            _block(4 * w, features, 1), _block(features, features, 2),  # -> [B, F, 4, 4]
        )  # fmt: skip
        self.heads = nn.ModuleDict({name: nn.Linear(features, n) for name, n in HEADS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images * 2.0 - 1.0).mean(dim=(2, 3))  # -> [B, F]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {name: head(f) for name, head in self.heads.items()}  # -> {name: [B, classes]}


@dataclass(frozen=True)
class EvaluatorConfig:
    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 2e-3
    width: int = 16
    features: int = 64
    seed: int = 0
    randomize: bool = False  # domain randomization (common/randomize.py) on top of flips and shifts


@dataclass(frozen=True)
class LabelledSlices:
    """Images [N, H, W] in [0, 1] with modality, pathology and field-class labels [N]."""

    images: np.ndarray
    modality: np.ndarray
    pathology: np.ndarray
    field: np.ndarray

    def labels(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(getattr(self, name)[rows].astype(np.int64)) for name in HEADS}


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Left-right flips, ±3 px shifts and a random gamma: what scanners vary and contrast does not."""
    b = len(images)
    flip = torch.rand(b, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=generator))
    images = torch.roll(images, shifts=(dy, dx), dims=(-2, -1))
    gamma = torch.exp(torch.empty(b, 1, 1, 1).uniform_(-0.25, 0.25, generator=generator))
    return images.clamp(0, 1) ** gamma


def train_evaluator(
    data: LabelledSlices, cfg: EvaluatorConfig, progress: Callable[[int, int, float], None] | None = None
) -> EvaluatorNet:
    """Joint cross-entropy on the three heads, AdamW with a cosine schedule."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    net = EvaluatorNet(cfg.width, cfg.features).train()
    images = torch.from_numpy(data.images.astype(np.float32)).unsqueeze(1)  # -> [N, 1, 64, 64]

    def loss_at() -> torch.Tensor:
        rows = torch.randint(len(images), (cfg.batch_size,), generator=generator).numpy()
        batch = _augment(images[rows], generator)  # -> [B, 1, 64, 64]
        logits = net(randomize(batch, generator) if cfg.randomize else batch)
        targets = data.labels(rows)
        return torch.stack([nn.functional.cross_entropy(logits[name], targets[name]) for name in HEADS]).sum()

    fit(net, cfg.steps, cfg.learning_rate, loss_at, progress)
    return net


class Evaluator:
    """A loaded evaluator: numpy images [N, H, W] in [0, 1] in, features or class indices out."""

    def __init__(self, net: EvaluatorNet, provenance: dict | None = None) -> None:
        self.net = net.eval()
        self.provenance = provenance or {}

    @torch.no_grad()
    def run(self, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One pass: (features [N, F] float64, {head: [N] class index})."""
        feats: list[np.ndarray] = []
        logits: dict[str, list[np.ndarray]] = {name: [] for name in HEADS}
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.asarray(images[start : start + batch], dtype=np.float32)).unsqueeze(1)
            f = self.net.features(x)
            feats.append(f.numpy())
            for name, head in self.net.heads.items():
                logits[name].append(head(f).numpy())
        empty = np.zeros((0, self.net.feature_dim), dtype=np.float32)
        return (
            (np.concatenate(feats) if feats else empty).astype(np.float64),
            {name: np.concatenate(v).argmax(-1) if v else np.zeros(0, dtype=np.int64) for name, v in logits.items()},
        )

    def features(self, images: np.ndarray) -> np.ndarray:
        """[N, H, W] -> [N, F] float64, the Fréchet-distance feature space."""
        return self.run(images)[0]

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """[N, H, W] -> {head: [N] class index} (modality/pathology ordinals, FIELD_CLASSES index)."""
        return self.run(images)[1]


def accuracy(evaluator: Evaluator, data: LabelledSlices) -> dict[str, float]:
    predicted = evaluator.predict(data.images)
    return {name: float((predicted[name] == getattr(data, name)).mean()) for name in HEADS}


def save_evaluator(net: EvaluatorNet, cfg: EvaluatorConfig, out: Path, provenance: dict) -> Path:
    """Write OUT/evaluator.safetensors and OUT/provenance.json (config, data, accuracy, sha256)."""
    heads = {"modality": [m.value for m in Modality], "pathology": [p.value for p in Pathology],
             "field": list(FIELD_CLASSES)}  # fmt: skip
    return save_network(out, WEIGHTS, net.state_dict(), {**provenance, "config": asdict(cfg), "heads": heads})


def load_evaluator(directory: Path | None = None) -> Evaluator:
    """The evaluator in `directory` (default: the shipped one), after checking its sha256 against provenance."""
    rebuild = "`fedmri train-evaluator --out DIR`"
    state, provenance = load_network(directory or shipped_dir(EVALUATOR_DIR, rebuild), WEIGHTS, rebuild)
    cfg = EvaluatorConfig(**provenance["config"])
    net = EvaluatorNet(cfg.width, cfg.features)
    net.load_state_dict(state)
    return Evaluator(net, provenance)


# T1w and T1ce are one family when reading real scans: without a pre-contrast pair, a T1ce with no
# enhancing lesion is a T1w to any reader (issue 13's real-data target counts the family).
FAMILIES = {Modality.T1w.ordinal: "T1", Modality.T1ce.ordinal: "T1"}


def modality_confusion(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """[M, M] counts: row = true modality ordinal, column = predicted."""
    counts = np.zeros((len(Modality), len(Modality)), dtype=np.int64)
    np.add.at(counts, (truth, predicted), 1)
    return counts


def modality_accuracy(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Exact accuracy, and accuracy with T1w and T1ce counted as one family."""
    family = lambda m: np.array([FAMILIES.get(int(v), str(int(v))) for v in m])  # noqa: E731
    return {
        "modality": float((truth == predicted).mean()),
        "modality_t1_family": float((family(truth) == family(predicted)).mean()),
    }
