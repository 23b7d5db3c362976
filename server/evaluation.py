"""Federated evaluation: send a release to every site, collect aggregates, tabulate and plot them.

Sites evaluate on their own held-out subjects (client/evaluate.py) and return only aggregates.
The server adds what needs no patient data: condition adherence over the whole grid of
modality x pathology x field strength, generated from the release and classified by the public
evaluator, each combination marked with the sites that hold it (or none: an unseen combination).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.conditions import Conditions, Modality, Pathology
from common.evaluator import FIELD_CLASSES, HEADS, Evaluator, field_class
from common.metrics import adherence
from common.model import LDM
from common.prompts import conditions_to_vector
from common.protocol import SEGMENT_KEYS, TRANSLATE_KEYS, EvalReply, EvalRequest
from common.run_config import RunConfig
from common.sampling import sample
from common.segmenter import MASK_CONTRASTS, Segmenter, dice
from sites.bids import SiteSlices

log = logging.getLogger("fedmri.server")

SITE_COLUMNS = (
    "n_generated", "n_heldout_subjects", "fd", "fd_real", "ms_ssim", "ms_ssim_real", "adherence_modality",
    "adherence_real_modality", "adherence_pathology", "adherence_real_pathology", "adherence_field",
    "adherence_real_field", "memorized",
)  # fmt: skip


def release_message_content(ldm: LDM, request: EvalRequest) -> RecordDict:
    """The release as arrays (VAE and denoiser) and the request (with the release's JSON files)."""
    return RecordDict(
        {
            "vae": ArrayRecord(ldm.vae.state_dict()),
            "denoiser": ArrayRecord(ldm.denoiser.state_dict()),
            "config": ConfigRecord(request.to_record()),
        }
    )


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= count or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def collect_site_results(grid: Grid, ldm: LDM, request: EvalRequest, min_nodes: int, timeout: float) -> dict:
    """{site_id: {key: value}} from every site that answered; errors are logged and listed under 'errors'."""
    nodes = wait_for_nodes(grid, min_nodes, timeout)
    content = release_message_content(ldm, request)
    messages = [Message(content=content, dst_node_id=node, message_type="evaluate") for node in nodes]
    results: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            errors[str(reply.metadata.src_node_id)] = reply.error.reason
            log.warning("evaluation failed at node %s: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        try:
            answer = EvalReply.from_record(reply.content["reply"], reply.content["metrics"])
        except (KeyError, ValueError) as err:
            errors[str(reply.metadata.src_node_id)] = f"malformed evaluation reply: {err}"
            log.warning("evaluation reply from node %s refused: %s", reply.metadata.src_node_id, err)
            continue
        results[answer.site_id] = dict(answer.metrics)
    return {"sites": results, "errors": errors}


def site_rows(results: dict[str, dict[str, float]]) -> list[dict]:
    """One row per (site, modality, pathology) from the flat "<modality>/<pathology>/<key>" metrics."""
    rows = []
    for site_id, metrics in sorted(results.items()):
        conditions = sorted({tuple(k.split("/")[:2]) for k in metrics if k.count("/") == 2})
        for modality, pathology in conditions:
            row: dict = {"site": site_id, "modality": modality, "pathology": pathology}
            row.update({c: metrics.get(f"{modality}/{pathology}/{c}", float("nan")) for c in SITE_COLUMNS})
            rows.append(row)
    return rows


def utility_rows(results: dict[str, dict[str, float]]) -> list[dict]:
    return [
        {"site": site_id, **{k.removeprefix("utility_"): v for k, v in m.items() if k.startswith("utility_")}}
        for site_id, m in sorted(results.items())
        if "utility_real_only" in m
    ]


def translation_rows(results: dict[str, dict[str, float]]) -> list[dict]:
    """One row per (site, sources, target) from the "translate/<sources>/<target>/<key>" metrics
    (client/evaluate_translation.py), with the gain over the copy baseline."""
    rows = []
    for site_id, metrics in sorted(results.items()):
        pairs = sorted({tuple(k.split("/")[1:3]) for k in metrics if k.startswith("translate/")})
        for sources, target in pairs:
            value = {key: metrics.get(f"translate/{sources}/{target}/{key}", float("nan")) for key in TRANSLATE_KEYS}
            rows.append({
                "site": site_id, "sources": sources, "target": target, **value,
                "psnr_gain_db": value["psnr"] - value["psnr_copy"], "ssim_gain": value["ssim"] - value["ssim_copy"],
            })  # fmt: skip
    return rows


def _translation_summary(rows: list[dict]) -> dict[str, dict]:
    """evaluation.json's view of translation rows: the figures per site (and field) and pair."""
    keys = ("ssim", "psnr", "ssim_copy", "psnr_copy", "psnr_gain_db")
    summary = {}
    for r in rows:
        where = f"{r['site']} ({r['field']})" if "field" in r else r["site"]
        summary[f"{where}: {r['sources']} -> {r['target']}"] = {k: r[k] for k in keys}
    return summary


def segmentation_rows(results: dict[str, dict[str, float]]) -> list[dict]:
    """One row per (site, pathology) from the "segment/<pathology>/<key>" metrics
    (client/evaluate_segmentation.py), with the relative gain of adding the synthetic pairs."""
    rows = []
    for site_id, metrics in sorted(results.items()):
        for pathology in sorted({k.split("/")[1] for k in metrics if k.startswith("segment/")}):
            value = {key: metrics.get(f"segment/{pathology}/{key}", float("nan")) for key in SEGMENT_KEYS}
            gain = (
                value["dice_with_synthetic"] / value["dice_real_only"] - 1
                if value["dice_real_only"] > 0
                else float("nan")
            )
            rows.append({"site": site_id, "pathology": pathology, **value, "relative_gain": gain})
    return rows


def field_of(slices: SiteSlices) -> int:
    """The field class (common/evaluator.field_class) of a single-field site."""
    classes = np.unique(field_class(slices.field_strength[np.isfinite(slices.field_strength)]))
    if len(classes) != 1:
        raise ValueError(f"a reference site for translation holds one field strength, got classes {classes.tolist()}")
    return int(classes[0])


def unseen_translation_rows(
    ldm: LDM, public_sites: list[str], sites: dict[str, dict[str, float]], request: EvalRequest
) -> list[dict]:
    """Translation pairs that no site holds, scored by the server on public reference sites.

    A site holds (sources, target) at a field class when it reported that pair from its held-out
    subjects and trained on the target contrast at that field ("held/..." flags). The server
    reads each public site's held-out subjects (its YAML's holdout_fraction) and scores every
    other pair they allow, as a site would (client/evaluate_translation.py)."""
    from client.evaluate_translation import translation_metrics
    from sites.bids import read_site_data, split_subjects
    from sites.config import load_site

    held = held_combinations(sites)
    rows = []
    for path in public_sites:
        site = load_site(Path(path))
        _, heldout = split_subjects(read_site_data(site), site.site_id, site.data.holdout_fraction)
        try:
            field = field_of(heldout)
        except ValueError as err:  # the report goes on without this site, and says why
            log.warning("translation: %s skipped: %s", site.site_id, err)
            continue
        skip = {
            (sources, target)
            for site_id, metrics in sites.items()
            for sources, target in {tuple(k.split("/")[1:3]) for k in metrics if k.startswith("translate/")}
            if any(site_id in ids for (m, _, f), ids in held.items() if m == target and f == field)
        }
        metrics = translation_metrics(ldm, heldout, request, skip=skip)
        for row in translation_rows({site.site_id: metrics}):
            rows.append({**row, "field": FIELD_CLASSES[field], "held_by": "none (unseen)"})
        log.info("translation: %d pairs no site holds scored on %s", len(metrics) // len(TRANSLATE_KEYS), site.site_id)
    return rows


def held_combinations(results: dict[str, dict[str, float]]) -> dict[tuple[str, str, int], list[str]]:
    """(modality, pathology, field class) -> the sites that hold it in training ("held/..." flags)."""
    held: dict[tuple[str, str, int], list[str]] = {}
    for site_id, metrics in results.items():
        for key in metrics:
            if key.startswith("held/"):
                _, modality, pathology, field = key.split("/")
                held.setdefault((modality, pathology, int(field)), []).append(site_id)
    return held


def grid_adherence(
    ldm: LDM,
    evaluator: Evaluator,
    held: dict[tuple[str, str, int], list[str]],
    samples: int,
    steps: int,
    seed: int = 0,
) -> list[dict]:
    """Adherence of every modality x pathology x field-strength combination, generated at mid-brain."""
    requests = [
        (m, p, f) for f in range(len(FIELD_CLASSES)) for m in Modality for p in Pathology for _ in range(samples)
    ]
    conditions = torch.stack(
        [
            conditions_to_vector(
                Conditions(modality=m, pathology=p, field_strength=FIELD_CLASSES[f], slice_position=0.55)
            )
            for m, p, f in requests
        ]
    )
    images = sample(ldm, conditions, steps, 3.0, "dpm++", seed, batch_size=32)[:, 0].numpy()
    predicted = evaluator.predict(images)
    rows = []
    for start in range(0, len(requests), samples):
        m, p, f = requests[start]
        part = slice(start, start + samples)
        sites = held.get((m.value, p.value, f), [])
        rows.append(
            {
                "modality": m.value,
                "pathology": p.value,
                "field_T": FIELD_CLASSES[f],
                "held_by": "+".join(sorted(sites)) or "none (unseen)",
                "n": samples,
                "adherence_modality": adherence(predicted["modality"][part], np.full(samples, m.ordinal)),
                "adherence_pathology": adherence(predicted["pathology"][part], np.full(samples, p.ordinal)),
                "adherence_field": adherence(predicted["field"][part], np.full(samples, f)),
            }
        )
    return rows


def mask_adherence_rows(ldm: LDM, segmenter: Segmenter, samples: int, steps: int, seed: int = 0) -> list[dict]:
    """Mask adherence (issue 15) of a model with the mask branch: for each lesion, contrast and field
    strength, `samples` slices generated to follow random plausible masks from the public prior
    (sites/lesion_prior.py, so no site is read), and the mean whole-lesion Dice between each mask
    and the lesion the segmenter finds. Beside it, the segmenter's Dice on real reference slices
    of that lesion and contrast: the most a perfect generator could score."""
    from sites.lesion_prior import lesion_mask, random_request

    rng = np.random.default_rng(seed)
    ceiling = segmenter.provenance.get("validation_dice_by_modality", {})
    requests = [(p, m, f) for p, contrasts in MASK_CONTRASTS.items() for m in contrasts for f in FIELD_CLASSES]
    conditions, masks = [], []
    for p, m, f in requests:
        for _ in range(samples):
            conditions.append(
                conditions_to_vector(Conditions(modality=m, pathology=p, field_strength=f, slice_position=0.55))
            )
            masks.append(lesion_mask(random_request(p, rng), rng, ldm.settings.image_size, ldm.settings.fov_mm))
    asked = np.stack(masks)  # -> [R·samples, H, W]
    images = sample(
        ldm, torch.stack(conditions), steps, 3.0, "dpm++", seed, batch_size=32, masks=torch.from_numpy(asked)
    )
    found = segmenter.segment(images[:, 0].numpy())
    scores = dice(found, asked)
    return [
        {"pathology": p.value, "modality": m.value, "field_T": f, "n": samples,
         "mask_dice": float(np.nanmean(scores[i * samples : (i + 1) * samples])),
         "segmenter_on_real": ceiling.get(p.value, {}).get(m.value, float("nan"))}
        for i, (p, m, f) in enumerate(requests)
    ]  # fmt: skip


def summarize(rows: list[dict]) -> dict[str, float]:
    """Mean adherence per head over all combinations, over held ones and over unseen ones."""
    out: dict[str, float] = {}
    for part, chosen in (
        ("all", rows),
        ("held", [r for r in rows if not r["held_by"].startswith("none")]),
        ("unseen", [r for r in rows if r["held_by"].startswith("none")]),
    ):
        for head in HEADS:
            if chosen:
                out[f"{part}_{head}"] = float(np.mean([r[f"adherence_{head}"] for r in chosen]))
    return out


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.3g}"
    return str(value)


def write_table(rows: list[dict], stem: Path) -> tuple[Path, Path]:
    """stem.csv and stem.md with the same rows."""
    columns = list(rows[0]) if rows else []
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".csv"), stem.with_suffix(".md")


def plot_report(site: list[dict], grid: list[dict], utility: list[dict], path: Path) -> Path:
    """One PNG: adherence heat maps per field strength, FD per site/condition, and few-shot utility."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    modalities, pathologies = [m.value for m in Modality], [p.value for p in Pathology]
    for ax, tesla in zip(axes[0], FIELD_CLASSES, strict=True):
        table = np.full((len(modalities), len(pathologies)), np.nan)
        unseen = np.zeros_like(table, dtype=bool)
        for r in grid:
            if r["field_T"] == tesla:
                i, j = modalities.index(r["modality"]), pathologies.index(r["pathology"])
                table[i, j] = r["adherence_modality"]
                unseen[i, j] = r["held_by"].startswith("none")
        ax.imshow(table, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(modalities)):
            for j in range(len(pathologies)):
                if not np.isnan(table[i, j]):
                    label = f"{table[i, j]:.0%}" + ("*" if unseen[i, j] else "")
                    ax.text(j, i, label, ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(pathologies)), pathologies, fontsize=8)
        ax.set_yticks(range(len(modalities)), modalities, fontsize=8)
        ax.set_title(f"modality adherence at {tesla:g} T (* unseen)", fontsize=9)
    labels = [f"{r['site']}\n{r['modality']}/{r['pathology']}" for r in site]
    x = np.arange(len(site))
    axes[1, 0].bar(x - 0.2, [r["fd"] for r in site], 0.4, label="generated vs held-out")
    axes[1, 0].bar(x + 0.2, [r["fd_real"] for r in site], 0.4, label="training vs held-out (floor)")
    axes[1, 0].set_xticks(x, labels, fontsize=5, rotation=90)
    axes[1, 0].set_title("Fréchet distance (evaluator features)", fontsize=9)
    axes[1, 0].legend(fontsize=7)
    axes[1, 1].bar(x - 0.2, [r["ms_ssim"] for r in site], 0.4, label="generated pairs")
    axes[1, 1].bar(x + 0.2, [r["ms_ssim_real"] for r in site], 0.4, label="held-out pairs")
    axes[1, 1].set_xticks(x, labels, fontsize=5, rotation=90)
    axes[1, 1].set_title("MS-SSIM within a condition (lower = more diverse)", fontsize=9)
    axes[1, 1].legend(fontsize=7)
    u = np.arange(len(utility))
    axes[1, 2].bar(u - 0.2, [r["real_only"] for r in utility], 0.4, label="k real only")
    axes[1, 2].bar(u + 0.2, [r["with_synthetic"] for r in utility], 0.4, label="k real + synthetic")
    axes[1, 2].set_xticks(u, [r["site"] for r in utility], fontsize=8)
    axes[1, 2].set_ylim(0, 1)
    axes[1, 2].set_title("few-shot contrast classifier, held-out accuracy", fontsize=9)
    axes[1, 2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_evaluation(grid: Grid, run: RunConfig) -> list[Path]:
    """Verify and load the release, evaluate at every site and over the grid; write the report into run-dir."""
    from common.evaluator import load_evaluator
    from common.mask_branch import has_mask_branch
    from common.model import load_ldm, model_configs
    from common.release import MANIFEST, verify_release
    from common.segmenter import load_segmenter

    model = Path(run.eval_model)
    if (model / MANIFEST).exists():
        verify_release(model)  # raises ReleaseError naming what does not check
        log.info("release %s verified", model)
    ldm = load_ldm(model)
    request = EvalRequest(
        samples_per_condition=run.eval_samples,
        steps=run.eval_steps,
        seed=run.seed,
        min_subjects=run.eval_min_subjects,
        model_configs=model_configs(model),
    )
    start = time.time()
    collected = collect_site_results(grid, ldm, request, run.min_train_nodes, run.round_timeout)
    sites = collected["sites"]
    log.info("evaluation: %d sites answered in %.0f s", len(sites), time.time() - start)
    grid_rows = grid_adherence(
        ldm, load_evaluator(), held_combinations(sites), run.eval_grid_samples, run.eval_steps, run.seed
    )
    masked = has_mask_branch(ldm.denoiser.unet)
    mask_rows = (
        mask_adherence_rows(ldm, load_segmenter(), run.eval_grid_samples, run.eval_steps, run.seed) if masked else []
    )
    translated = translation_rows(sites)
    segmented = segmentation_rows(sites)
    unseen_pairs = (
        unseen_translation_rows(ldm, run.eval_public_sites.split(","), sites, request)
        if translated and run.eval_public_sites
        else []
    )
    out = Path(run.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        *write_table(site_rows(sites), out / "evaluation_sites"),
        *write_table(grid_rows, out / "evaluation_adherence"),
        *write_table(utility_rows(sites), out / "evaluation_utility"),
        plot_report(site_rows(sites), grid_rows, utility_rows(sites), out / "evaluation.png"),
        *(write_table(mask_rows, out / "evaluation_masks") if mask_rows else ()),
        *(write_table(translated, out / "evaluation_translation") if translated else ()),
        *(write_table(segmented, out / "evaluation_segmentation") if segmented else ()),
        *(write_table(unseen_pairs, out / "evaluation_translation_unseen") if unseen_pairs else ()),
    ]
    summary = {
        "model": str(model),
        "sites": sorted(sites),
        "errors": collected["errors"],
        "adherence": summarize(grid_rows),
        "mask_adherence": {
            p.value: float(np.mean([r["mask_dice"] for r in mask_rows if r["pathology"] == p.value]))
            for p in MASK_CONTRASTS
        }
        if mask_rows
        else "the model has no mask branch",
        "segmentation_gain": {f"{r['site']}: {r['pathology']}": r for r in segmented}
        if segmented
        else "not measured (the model has no mask branch, or no site has k patients with lesion masks)",
        "translation": _translation_summary(translated) if translated else "the model has no source branch",
        "translation_unseen": _translation_summary(unseen_pairs)
        if unseen_pairs
        else "not scored (no source branch, or no eval-public-sites)",
        "request": {k: v for k, v in asdict(request).items() if k != "model_configs"},
        "wall_s": round(time.time() - start, 1),
    }
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2))
    return [*written, out / "evaluation.json"]
