"""`fedmri` commands for the shipped evaluator: train it on the public reference sites, check it on real scans."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from common.cli_helpers import MODEL_PANEL, SITES_DIR, console
from common.evaluator import EvaluatorConfig
from common.segmenter import SegmenterConfig

if TYPE_CHECKING:
    from common.evaluator import LabelledSlices
    from sites.bids import SiteSlices

app = typer.Typer(rich_markup_mode="markdown")
_EVALUATOR = EvaluatorConfig()  # the defaults of `fedmri train-evaluator`
_SEGMENTER = SegmenterConfig()  # the defaults of `fedmri train-segmenter`


def labelled(slices: SiteSlices) -> LabelledSlices:
    """A site's slices with the evaluator's three labels."""
    import numpy as np

    from common.evaluator import LabelledSlices, field_class

    if (unknown := np.isnan(slices.conditions()[:, :3]).any(1)).any():
        raise ValueError(
            f"{int(unknown.sum())} slices have an unknown modality, pathology or field: no label to train on"
        )
    return LabelledSlices(slices.images, slices.modality, slices.pathology, field_class(slices.field_strength))


def reference_splits(sites_dir: Path) -> tuple[list[tuple[SiteSlices, SiteSlices]], dict]:
    """(training, validation) slices of every public reference site, split by subject at each YAML's
    holdout_fraction (made under `sites_dir` if missing), and a summary per site."""
    from sites.bids import read_site_data, split_subjects
    from sites.cli import make_scenario_sites
    from sites.config import load_site
    from sites.scenarios import reference_sites

    splits, summary = [], {}
    for path in make_scenario_sites(reference_sites(), sites_dir):
        site = load_site(path)
        data = read_site_data(site)
        fit, held = split_subjects(data, site.site_id, site.data.holdout_fraction)
        splits.append((fit, held))
        summary[site.site_id] = {**data.summary(), "training_subjects": len(fit.subjects),
                                 "validation_subjects": len(held.subjects)}  # fmt: skip
    return splits, summary


@app.command("train-evaluator", rich_help_panel=MODEL_PANEL)
def train_evaluator(
    out: Annotated[Path, typer.Option(help="Evaluator directory to write (evaluator.safetensors + provenance.json).")],
    sites_dir: Annotated[
        Path, typer.Option("--sites", help="Where the public reference sites are (made there if missing).")
    ] = SITES_DIR,
    steps: Annotated[int, typer.Option(help="Optimisation steps.")] = _EVALUATOR.steps,
    batch_size: Annotated[int, typer.Option(help="Slices per step.")] = _EVALUATOR.batch_size,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and sampling.")] = _EVALUATOR.seed,
    randomize: Annotated[
        bool,
        typer.Option(
            help="Domain randomization (common/randomize.py): intensity curve, gamma, bias, noise, "
            "blur, resolution, skull stripping, crops; for real scans."
        ),
    ] = _EVALUATOR.randomize,
) -> None:
    """Train fedmri's evaluator on the public **reference** sites (every contrast and pathology at 0.3, 1.5, 3 T).

    One small CNN: its pooled features are the space of the Fréchet distance; its three heads
    classify modality, pathology and field strength (condition adherence). Validation subjects
    (each reference YAML's holdout_fraction, split by subject) are never trained on; their
    accuracy goes into provenance.json with the command, config, data summary and sha256.
    The shipped evaluator (common/weights/fedmri-eval-v2) was made by this command.
    """
    import time

    import numpy as np
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from common.evaluator import Evaluator, LabelledSlices, accuracy, save_evaluator
    from common.evaluator import train_evaluator as run_training

    start = time.perf_counter()
    splits, summary = reference_splits(sites_dir)
    training, validation = [labelled(fit) for fit, _ in splits], [labelled(held) for _, held in splits]

    def stack(parts: list) -> LabelledSlices:
        return LabelledSlices(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("images", "modality", "pathology", "field"))
        )

    fit_data, val_data = stack(training), stack(validation)
    cfg = EvaluatorConfig(steps=steps, batch_size=batch_size, seed=seed, randomize=randomize)
    with Progress(TextColumn("evaluator"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
                  TimeElapsedColumn(), console=console) as bar:  # fmt: skip
        task = bar.add_task("train", total=steps, loss=0.0)
        net = run_training(fit_data, cfg, lambda step, total, loss: bar.update(task, completed=step, loss=loss))
    val_accuracy = accuracy(Evaluator(net), val_data)
    save_evaluator(net, cfg, out, {
        "command": "fedmri " + shlex.join(sys.argv[1:]),
        "data": summary,
        "slices": {"training": len(fit_data.images), "validation": len(val_data.images)},
        "validation_accuracy": val_accuracy,
        "wall_time_s": round(time.perf_counter() - start, 1),
    })  # fmt: skip
    console.print(
        f"evaluator written to {out}: validation accuracy (held-out reference subjects) "
        + ", ".join(f"{k} {v:.1%}" for k, v in val_accuracy.items())
    )


@app.command("train-segmenter", rich_help_panel=MODEL_PANEL)
def train_segmenter(
    out: Annotated[Path, typer.Option(help="Segmenter directory to write (segmenter.safetensors + provenance.json).")],
    sites_dir: Annotated[
        Path, typer.Option("--sites", help="Where the public reference sites are (made there if missing).")
    ] = SITES_DIR,
    steps: Annotated[int, typer.Option(help="Optimisation steps.")] = _SEGMENTER.steps,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and sampling.")] = _SEGMENTER.seed,
) -> None:
    """Train fedmri's lesion segmenter on the public **reference** sites' glioma and MS masks.

    A small UNet (common/segmenter.py) that finds the lesion in a slice: the measure of mask
    adherence (issue 15). Validation subjects (each reference YAML's holdout_fraction) are never
    trained on; their whole-lesion Dice, per pathology, goes into provenance.json with the
    command, config and sha256. The shipped segmenter (common/weights/fedmri-seg-v1) was made by
    this command.
    """
    import time

    import numpy as np
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from common.conditions import Modality, Pathology
    from common.mask_branch import NO_MASK
    from common.segmenter import Segmenter, SegmenterConfig, dice, save_segmenter
    from common.segmenter import train_segmenter as run_training

    start = time.perf_counter()
    splits, summary = reference_splits(sites_dir)

    def known(parts: list) -> list[np.ndarray]:
        """Images, masks and pathology of the slices whose mask is known."""
        rows = [p.lesion_mask[:, 0, 0] != NO_MASK for p in parts]
        return [np.concatenate([getattr(p, name)[r] for p, r in zip(parts, rows, strict=True)])
                for name in ("images", "lesion_mask", "pathology", "modality")]  # fmt: skip

    fit_images, fit_masks, _, _ = known([fit for fit, _ in splits])
    val_images, val_masks, val_pathology, val_modality = known([held for _, held in splits])
    cfg = SegmenterConfig(steps=steps, seed=seed)
    with Progress(TextColumn("segmenter"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
                  TimeElapsedColumn(), console=console) as bar:  # fmt: skip
        task = bar.add_task("train", total=steps, loss=0.0)
        net = run_training(
            fit_images, fit_masks, cfg, lambda step, total, loss: bar.update(task, completed=step, loss=loss)
        )
    found = Segmenter(net).segment(val_images)
    scores = dice(found, val_masks)
    validation, by_modality = {}, {}
    for p in (Pathology.glioma, Pathology.ms):
        mine = val_pathology == p.ordinal
        if np.isfinite(scores[mine]).any():
            validation[p.value] = round(float(np.nanmean(scores[mine])), 4)
            by_modality[p.value] = {m.value: round(float(np.nanmean(scores[mine & (val_modality == m.ordinal)])), 4)
                                    for m in Modality if np.isfinite(scores[mine & (val_modality == m.ordinal)]).any()}  # fmt: skip
    lesion_free = (val_masks.reshape(len(val_masks), -1) == 0).all(1)
    false_alarms = float((found[lesion_free].reshape(int(lesion_free.sum()), -1) > 0).any(1).mean())
    save_segmenter(net, cfg, out, {
        "command": "fedmri " + shlex.join(sys.argv[1:]),
        "data": summary,
        "slices": {"training": len(fit_images), "validation": len(val_images)},
        "validation_dice": validation,
        "validation_dice_by_modality": by_modality,
        "validation_lesion_free_slices_with_a_finding": round(false_alarms, 4),
        "wall_time_s": round(time.perf_counter() - start, 1),
    })  # fmt: skip
    console.print(
        f"segmenter written to {out}: whole-lesion Dice on held-out reference subjects "
        + ", ".join(f"{k} {v:.2f}" for k, v in validation.items())
        + f"; lesion-free slices with a finding {false_alarms:.1%}"
    )


evaluator_app = typer.Typer(help="The shipped evaluator (condition adherence, FD features): check it on real scans.")
app.add_typer(evaluator_app, name="evaluator", rich_help_panel=MODEL_PANEL)


@evaluator_app.command("check")
def evaluator_check(
    real: Annotated[
        Path, typer.Option(help="Folder of real NIfTI files named like `sub01_FLAIR.nii.gz` (modality last).")
    ],
    evaluator: Annotated[Path | None, typer.Option(help="Evaluator directory (default: the shipped one).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """Print the evaluator's modality confusion on labelled **real** scans, per slice and per file.

    Slices are cut as a site's reader cuts them (64 px, 220 mm). The label is the file name's
    last `_` field; other files (lesion masks) are listed as skipped. Validation only: a folder
    used here must never be used to train or tune the evaluator or the model.
    """
    import json

    import numpy as np
    from rich.table import Table

    from common.conditions import Modality
    from common.evaluator import load_evaluator, modality_accuracy, modality_confusion
    from sites.real_scans import read_real_scans

    try:
        scans = read_real_scans(real)
        model = load_evaluator(evaluator)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    predicted = model.predict(scans.images.astype(np.float32))["modality"]
    names = [m.value for m in Modality]
    per_file = Table(title=f"{real}: {len(scans.files)} files, {len(scans.images)} slices")
    for column in ("file", "labelled", "called (most slices)", "slices right"):
        per_file.add_column(column, overflow="fold")
    files = {}
    for i, name in enumerate(scans.files):
        rows = scans.scan == i
        truth = int(scans.modality[rows][0])
        votes = np.bincount(predicted[rows], minlength=len(names))
        called, right = names[int(votes.argmax())], float((predicted[rows] == truth).mean())
        files[name] = {"labelled": names[truth], "called": called, "slices_right": right}
        per_file.add_row(name, names[truth], called, f"{right:.0%}")
    console.print(per_file)
    counts = modality_confusion(scans.modality, predicted)
    confusion = Table(title="modality confusion (slices): row = labelled, column = called")
    confusion.add_column("")
    for name in names:
        confusion.add_column(name, justify="right")
    for i, name in enumerate(names):
        if counts[i].sum():
            confusion.add_row(name, *(str(c) for c in counts[i]))
    console.print(confusion)
    figures = modality_accuracy(scans.modality, predicted)
    console.print(
        f"slice accuracy {figures['modality']:.1%}; with T1w and T1ce as one family {figures['modality_t1_family']:.1%}"
    )
    for name, why in scans.skipped.items():
        console.print(f"skipped {name}: {why}")
    if json_out is not None:
        record = {"folder": str(real), "evaluator": model.provenance.get("files"), **figures,
                  "slices": len(scans.images), "confusion": counts.tolist(), "classes": names, "files": files,
                  "skipped": scans.skipped}  # fmt: skip
        json_out.write_text(json.dumps(record, indent=2))
