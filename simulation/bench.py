"""`fedmri bench`: speed, memory, bytes and scale, measured as ratios within one run.

Every comparison uses the same model (the shipped base) and the same batch:
- dp_step_over_plain_step: median wall time of a DP-SGD step (client/trainer.make_private, the
  one place Opacus is called) over a plain autograd step, per fine-tuning mode, interleaved so
  that machine noise hits both; and the same DP step with ChaCha20 noise (as sites run it) over
  one with torch-generator noise (secure_noise_over_torch_noise); peak memory of each in a fresh process (ru_maxrss of that
  process minus its resident size just before the first step).
- upload_bytes_per_round: the bytes of the ArrayRecord a site sends (its trainable tensors).
- federation_overhead: round 2 of a one-site simulation (Flower Simulation Engine, warm actor)
  over the same site round run standalone (client.round.run_site_round, warm data cache).
- sampler_speedup: DDPM with 1000 steps over DPM-Solver++ with 20, both with the evaluator's
  adherence on the same prompts.
- scale: peak resident memory of the whole process tree and round wall time of a simulation of
  5, 20 and 50 `many-small` sites.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from common.protocol import Status, read_records

PROJECT_DIR = Path(__file__).resolve().parents[1]
MODES = ("full", "attention", "lora", "conditioning")


def machine() -> dict:
    import torch

    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# ---- steps ---------------------------------------------------------------------------------


def _step_setup(mode: str, batch: int, seed: int = 0, device: str = "cpu"):
    """The shipped base in `mode` on `device` and a fixed batch of `batch` rows of public-looking inputs."""
    import torch

    from common.finetune import configure, parse_mode
    from common.model import load_ldm
    from common.weights import base_model_dir

    torch.manual_seed(seed)
    ldm = load_ldm(base_model_dir()).to(torch.device(device))
    configure(ldm.denoiser, parse_mode(mode), 4)
    latents = torch.randn(batch, 4, ldm.latent_size, ldm.latent_size)  # -> [B, 4, 16, 16]
    conditions = torch.zeros(batch, 7)
    conditions[:, 2] = 1.5
    conditions[:, 3:6] = float("nan")
    conditions[:, 6] = 0.5
    return ldm, latents.to(device), conditions.to(device)


class TorchNormal:
    """The noise source Opacus uses without secure_mode (torch's generator), to price the CSPRNG's."""

    def normal(self, shape: tuple[int, ...], std: float):
        import torch

        return torch.randn(shape, dtype=torch.float64) * std


STEP_KINDS = ("plain", "dp", "dp_torch_noise")


def make_step(mode: str, batch: int, kind: str, rows_per_subject: int = 1, device: str = "cpu") -> Callable[[], float]:
    """A closure running one optimizer step on a fixed batch of `batch` subjects x `rows_per_subject`
    rows (K slices x M draws): plain, DP-SGD as sites run it (ChaCha20 noise, each subject's rows
    averaged before clipping), or the same DP-SGD step with torch-generator noise (what Opacus draws
    without secure_mode)."""
    import torch

    from client.policy import RoundPlan
    from client.secure_random import SecureRandom
    from client.trainer import group_by_subject, make_private
    from common.objective import ldm_loss

    if kind not in STEP_KINDS:
        raise ValueError(f"step kind {kind!r} is not one of {STEP_KINDS}")
    ldm, latents, conditions = _step_setup(mode, batch * rows_per_subject, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    model: torch.nn.Module = ldm.denoiser.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-5)
    if kind != "plain":
        plan = RoundPlan(
            local_steps=1, expected_batch_size=batch, sample_rate=batch / 64, noise_multiplier=1.0,
            max_grad_norm=1.0, learning_rate=1e-5,
        )  # fmt: skip
        noise = SecureRandom() if kind == "dp" else TorchNormal()
        model, optimizer = make_private(model, optimizer, plan, noise)  # type: ignore[arg-type]

    def step() -> float:
        start = time.perf_counter()
        loss = ldm_loss(model, ldm.scheduler, latents, conditions, generator, 0.1, 5.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if kind != "plain":
            group_by_subject(params, rows_per_subject)
        optimizer.step()
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def dp_step_timing(
    modes: tuple[str, ...], batch: int, repeats: int, rows_per_subject: int = 1, device: str = "cpu"
) -> dict:
    """Median seconds per plain step, DP step (secure noise) and DP step with torch noise, interleaved
    after one warm-up step each; the ratios are DP over plain and secure noise over torch noise."""
    out = {}
    for mode in modes:
        steps = {kind: make_step(mode, batch, kind, rows_per_subject, device) for kind in STEP_KINDS}
        for step in steps.values():
            step()
        times: dict[str, list[float]] = {kind: [] for kind in STEP_KINDS}
        for _ in range(repeats):
            for kind, step in steps.items():
                times[kind].append(step())
        p, d, t = (statistics.median(times[kind]) for kind in STEP_KINDS)
        out[mode] = {
            "plain_step_s": round(p, 4),
            "dp_step_s": round(d, 4),
            "ratio": round(d / p, 3),
            "dp_torch_noise_step_s": round(t, 4),
            "secure_noise_over_torch_noise": round(d / t, 3),
        }
    return out


def _status_kib(field: str) -> int:
    """VmRSS or VmHWM (peak resident size) of this process, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_worker(mode: str, batch: int, dp: bool, steps: int) -> None:
    """Run in a fresh process: reset the peak, step, print the peak resident KiB the steps added."""
    step = make_step(mode, batch, "dp" if dp else "plain")
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    for _ in range(steps):
        step()
    print(json.dumps({"rss_before_kib": before, "peak_kib": _status_kib("VmHWM")}))


def step_memory(modes: tuple[str, ...], batch: int, steps: int = 2) -> dict:
    """Peak resident memory the steps add above the loaded model (VmHWM after - VmRSS before), plain vs DP."""
    out = {}
    for mode in modes:
        added = {}
        for dp in (False, True):
            command = [sys.executable, "-m", "simulation.bench", "--worker", "memory", "--mode", mode,
                       "--batch", str(batch), "--steps", str(steps), *(["--dp"] if dp else [])]  # fmt: skip
            done = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"memory worker {' '.join(command)} failed:\n{done.stderr[-2000:]}")
            report = json.loads(done.stdout.strip().splitlines()[-1])
            added["dp" if dp else "plain"] = (report["peak_kib"] - report["rss_before_kib"]) / 1024
        out[mode] = {
            "plain_step_peak_mib": round(added["plain"], 1),
            "dp_step_peak_mib": round(added["dp"], 1),
            "ratio": round(added["dp"] / max(added["plain"], 1e-6), 3),
        }
    return out


def upload_bytes(modes: tuple[str, ...]) -> dict:
    """Bytes of the ArrayRecord a site sends per round in each mode, and each mode's ratio to full."""
    from flwr.app import ArrayRecord

    from common.finetune import configure, parse_mode, trainable_tensors
    from common.model import load_ldm
    from common.weights import base_model_dir

    sizes = {}
    for mode in modes:
        ldm = load_ldm(base_model_dir())
        configure(ldm.denoiser, parse_mode(mode), 4)
        record = ArrayRecord(trainable_tensors(ldm.denoiser))
        sizes[mode] = sum(len(array.data) for array in record.values())
    full = sizes.get("full")
    return {mode: {"bytes": n, "full_over_mode": round(full / n, 1) if full else None} for mode, n in sizes.items()}


# ---- multiplicity ----------------------------------------------------------------------------

MULTIPLICITIES = ((1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (8, 1))
CLIPS = (1.0, 0.1, 0.03, 0.01, 0.003)


def multiplicity_signal(
    yaml_path: Path,
    subjects: int,
    repeats: int,
    settings: tuple[tuple[int, int], ...] = MULTIPLICITIES,
    clips: tuple[float, ...] = CLIPS,
) -> dict:
    """How much of each subject's clipping budget points along the expected gradient, per (K, M, C).

    DP-SGD's step is (Σ_b clip_C(g_b) + N(0, σ²C²)) / B. Along the expected gradient's direction u
    its signal is Σ_b <clip_C(g_b), u> / B and its noise σC/B, so at a given σ (a given ε) the
    signal-to-noise ratio is proportional to `aligned` = mean_b <clip_C(g_b), u> / C. Averaging K
    slices and M draws inside g_b removes per-draw randomness before clipping, so `aligned` grows;
    the compute grows as K·M. u: the plain gradient over the same subjects with 8 slices x 4 draws
    each, from other draws. The shipped base in attention mode and in conditioning mode (its
    encoder subset), a synthetic site. The noise spreads over all d trainable coordinates while
    the signal lies along u, so the per-step signal-to-noise ratio is B·aligned/(σ√d).

    C matters as much: while C is far above the subjects' gradient norms, clipping does nothing
    and `aligned` is <g, u>/C, so the noise σC drowns the step; near the median norm, `aligned`
    approaches the gradients' cosine with u. Both are chosen here on synthetic (public-like) data,
    never on a hospital's.
    """
    import torch
    from opacus.grad_sample import GradSampleModule

    from client.round import site_data
    from client.trainer import TrainSettings, collate, group_by_subject, subject_loss
    from common.finetune import FinetuneMode, configure
    from common.model import load_ldm
    from common.weights import base_model_dir
    from sites.datasets import SubjectDataset

    ldm = load_ldm(base_model_dir())
    configure(ldm.denoiser, FinetuneMode.attention, 4)
    _, slices, _ = site_data(str(yaml_path))
    denoiser = ldm.denoiser.train()
    named = [(n, p) for n, p in denoiser.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # The conditioning mode's tensors are a subset of attention mode's (the encoder): one backward
    # gives both, each restricted to its own coordinates and reference direction.
    in_encoder = torch.cat([torch.full((p.numel(),), n.startswith("encoder.")) for n, p in named])
    subspaces = {"attention": torch.ones_like(in_encoder), "conditioning": in_encoder}
    chosen = list(range(min(subjects, len(slices.subjects))))
    out: dict = {"subjects": len(chosen), "repeats": repeats, "site": str(yaml_path),
                 "dimension": {mode: int(mask.sum()) for mode, mask in subspaces.items()}}  # fmt: skip
    rows = []
    for repeat in range(repeats):
        # Reference direction u: 8 slices x 4 draws per subject, plain autograd, its own seeds.
        reference = TrainSettings(slices_per_subject=8, noise_draws=4)
        data = SubjectDataset(slices, seed=10_000 + repeat, slices_per_subject=8)
        denoiser.zero_grad(set_to_none=True)
        generator = torch.Generator().manual_seed(10_000 + repeat)
        subject_loss(ldm, reference, generator)(denoiser, collate([data[i] for i in chosen])).backward()
        expected = torch.cat([p.grad.flatten() for p in params])
        denoiser.zero_grad(set_to_none=True)
        wrapped = GradSampleModule(denoiser, batch_first=True, loss_reduction="mean")
        for k, m in settings:
            data = SubjectDataset(slices, seed=repeat, slices_per_subject=k)
            generator = torch.Generator().manual_seed(repeat)
            loss = subject_loss(ldm, TrainSettings(slices_per_subject=k, noise_draws=m), generator)
            loss(wrapped, collate([data[i] for i in chosen])).backward()
            group_by_subject(params, k * m)
            every = torch.cat([p.grad_sample.flatten(1) for p in params], 1)  # -> [b, d]
            for mode, mask in subspaces.items():
                per_subject, u = every[:, mask], expected[mask] / expected[mask].norm()
                norms = per_subject.norm(dim=1)
                along = per_subject @ u  # -> [b]
                for clip in clips:
                    aligned = along / (norms / clip).clamp(min=1.0) / clip  # <clip_C(g_b), u> / C
                    rows.append({"mode": mode, "k": k, "m": m, "clip": clip, "aligned": float(aligned.mean()),
                                 "norm": float(norms.median())})  # fmt: skip
            for p in params:
                p.grad_sample = None
                p.grad = None
        wrapped.remove_hooks()
    table = []
    for mode in subspaces:
        root_d = float(subspaces[mode].sum()) ** 0.5
        for k, m in settings:
            for clip in clips:
                mine = [r for r in rows if (r["mode"], r["k"], r["m"], r["clip"]) == (mode, k, m, clip)]
                aligned = [r["aligned"] for r in mine]
                mean = statistics.mean(aligned)
                table.append({"mode": mode, "slices_per_subject": k, "noise_draws": m, "rows_per_subject": k * m,
                              "clip": clip, "aligned": round(mean, 4),
                              "aligned_sd": round(statistics.stdev(aligned), 4) if len(aligned) > 1 else None,
                              # per-step signal-to-noise along u at B = 16 subjects, σ = 1: B·aligned/(σ√d)
                              "step_snr_b16_sigma1": round(16 * mean / root_d, 5),
                              "median_subject_grad_norm": round(statistics.median(r["norm"] for r in mine), 4)})  # fmt: skip
    for row in table:  # signal at equal σ, relative to one slice and one draw, same mode and C
        base = next(r["aligned"] for r in table
                    if (r["mode"], r["rows_per_subject"], r["clip"]) == (row["mode"], 1, row["clip"]))  # fmt: skip
        row["signal_over_k1_m1"] = round(row["aligned"] / base, 3) if base > 0 else None
    out["table"] = table
    return out


# ---- federation ----------------------------------------------------------------------------


def _tree_rss_kib(root: int) -> int:
    """Resident KiB of `root` and every descendant (read from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE") // 1024
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * page
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def simulate_sites(yaml_paths: list[Path], rounds: int, steps: int, batch: int, out: Path) -> dict:
    """A simulation in a fresh process (its own Ray); returns its round records and peak tree RSS."""
    command = [sys.executable, "-m", "simulation.bench", "--worker", "simulate", "--out", str(out),
               "--rounds", str(rounds), "--steps", str(steps), "--batch", str(batch),
               "--sites", ",".join(str(p) for p in yaml_paths)]  # fmt: skip
    import shutil

    from sites.config import load_site

    for yaml_path in yaml_paths:  # the bench's own sites: every run starts unspent (ledger, key, marker)
        shutil.rmtree(load_site(yaml_path).home_dir, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # the bench's own run folder, replaced on a re-run
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=PROJECT_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss_kib(proc.pid))
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, stderr = proc.communicate()
    stop.set()
    watcher.join()
    wall = time.perf_counter() - start
    metrics = out / "metrics.jsonl"
    records = read_records(metrics.read_text()) if metrics.exists() else []
    if proc.returncode != 0 or len(records) != rounds:
        raise RuntimeError(f"simulation of {len(yaml_paths)} sites failed:\n{stderr.decode()[-3000:]}")
    for record in records:
        failed = {site: v.status.value for site, v in record.sites.items() if v.status != Status.TRAINED}
        if failed or record.accepted != len(yaml_paths):
            raise RuntimeError(f"round {record.round}: not every site trained, so its time is not comparable: {failed}")
    return {"records": records, "peak_rss_mib": round(peak / 1024, 1), "wall_s": round(wall, 1)}


def _simulate_worker(sites: str, rounds: int, steps: int, batch: int, out: Path) -> None:
    from common.run_config import RunConfig
    from simulation.engine import run_simulation

    run = RunConfig(
        num_server_rounds=rounds, local_steps=steps, batch_size=batch, run_dir=str(out), sites=sites,
        min_train_nodes=len(sites.split(",")), round_timeout=3600.0, slices_per_subject=1, noise_draws=1,
    )  # fmt: skip  # one row per subject: the federation stages measure overhead and scale, not multiplicity
    run_simulation(run, len(sites.split(",")))


def bench_sites(work: Path, count: int, subjects: int, budget: bool = False) -> list[Path]:
    """`count` many-small sites with `subjects` subjects each, under work/sites-<subjects>.

    The bench measures speed, so no budget stops these sites (ε ≤ 1e6), unless `budget`: then
    they keep the scenario's policy (ε ≤ 8), and a round calibrates σ as a hospital's does.
    """
    import dataclasses

    from sites import scenarios
    from sites.cli import make_scenario_sites

    hospitals = scenarios.create("many-small").hospitals[:count]
    if not budget:
        hospitals = [
            dataclasses.replace(h, privacy=dataclasses.replace(h.privacy, max_epsilon=1e6, max_local_steps=10_000))
            for h in hospitals
        ]
    folder = work / f"sites-{subjects}{'-budget' if budget else ''}"
    return make_scenario_sites(hospitals, folder, contact_sheets=False, subjects=subjects)


def federation_overhead(work: Path, steps: int, batch: int, subjects: int = 12) -> dict:
    """Round 2 of a one-site simulation over the same round at the site, run standalone."""
    import shutil

    from client.round import run_site_round
    from common.finetune import FinetuneMode, configure, trainable_tensors
    from common.model import load_ldm
    from common.protocol import RoundProposal
    from common.weights import base_model_dir
    from sites.config import load_site

    base = load_ldm(base_model_dir())
    configure(base.denoiser, FinetuneMode.attention, 4)
    global_tensors = trainable_tensors(base.denoiser)  # what the server sends in round 1
    (yaml_path,) = bench_sites(work, 1, subjects)
    simulated = simulate_sites([yaml_path], 2, steps, batch, work / "federation")
    round_s = simulated["records"][1].wall_s
    shutil.rmtree(load_site(yaml_path).home_dir, ignore_errors=True)  # the bench's own site starts unspent

    def standalone(server_round: int) -> float:
        start = time.perf_counter()
        # As the simulated round (_simulate_worker): K = M = 1.
        proposal = RoundProposal(server_round, 2, steps, batch, 1e-4, 1, 1, "shipped", FinetuneMode.attention, 4)
        run_site_round(str(yaml_path), 1, proposal, global_tensors)
        return time.perf_counter() - start

    standalone(1)  # warm-up: reads the site's data once, as the simulation's actor did in round 1
    alone = standalone(2)
    return {
        "ratio": round(round_s / alone, 3),
        "simulated_round_s": round_s,
        "standalone_round_s": round(alone, 2),
        "local_steps": steps,
        "batch_size": batch,
    }


def calibration_search(accountant: str, subjects: int = 96) -> dict:
    """σ calibration for a first round, by both searches of common.privacy.calibrate_noise.

    The plan is the demo's hospital-a under the run config's defaults: q = batch / N, every
    planned round's steps, the site policy's default ε, δ and σ floor.
    """
    from common.privacy import calibrate_noise
    from common.run_config import RunConfig
    from sites.config import PrivacyPolicy

    run, policy = RunConfig(), PrivacyPolicy()
    q, steps = run.batch_size / subjects, run.local_steps * run.num_server_rounds
    out: dict = {"sample_rate": round(q, 4), "steps": steps, "epsilon": policy.max_epsilon, "accountant": accountant}
    for search in ("bisect", "secant"):
        start = time.perf_counter()
        sigma = calibrate_noise([], q, steps, 1e-5, policy.max_epsilon, policy.min_noise_multiplier,
                                accountant=accountant, search=search)  # fmt: skip
        out[search] = {"sigma": sigma, "wall_s": round(time.perf_counter() - start, 2)}
    out["bisect_over_secant"] = round(out["bisect"]["wall_s"] / out["secant"]["wall_s"], 2)
    return out


def _round_worker(yaml_path: str, server_round: int, rounds: int, steps: int, batch: int) -> None:
    """One site round in this fresh process, as a deployed SuperNode runs each message."""
    start = time.perf_counter()
    from client.round import run_site_round, site_data
    from common.finetune import FinetuneMode, configure, trainable_tensors
    from common.model import load_ldm
    from common.protocol import RoundProposal
    from common.weights import base_model_dir

    imports = time.perf_counter() - start
    base = load_ldm(base_model_dir())  # the bench's stand-in for the tensors the server sends
    configure(base.denoiser, FinetuneMode.attention, 4)
    tensors = trainable_tensors(base.denoiser)
    began = time.perf_counter()
    site_data(yaml_path)
    data = time.perf_counter() - began
    began = time.perf_counter()
    proposal = RoundProposal(server_round, rounds + 1, steps, batch, 1e-4, 1, 1, "shipped", FinetuneMode.attention, 4)
    result = run_site_round(yaml_path, 1, proposal, tensors)  # planned: one more round than measured
    report = {"imports_s": imports, "site_data_s": data, "site_round_s": time.perf_counter() - began}
    print(json.dumps({**{k: round(v, 2) for k, v in report.items()}, "status": result.reply.status.value}))


def fresh_process_rounds(work: Path, rounds: int, steps: int, batch: int, subjects: int) -> dict:
    """Rounds 1..`rounds` of one run at one site, each in a fresh process (Flower 1.41's ClientApp
    isolation), at a site with the scenario's budget: what a deployed round costs besides its
    DP-SGD steps, and what round 2 saves (round 1's σ is in the ledger and is checked first: one
    accountant run instead of a search)."""
    (yaml_path,) = bench_sites(work, 1, subjects, budget=True)
    out: dict = {"local_steps": steps, "batch_size": batch}
    for server_round in range(1, rounds + 1):
        command = [sys.executable, "-m", "simulation.bench", "--worker", "round", "--sites", str(yaml_path),
                   "--rounds", str(rounds), "--round", str(server_round), "--steps", str(steps),
                   "--batch", str(batch)]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"the fresh-process round {server_round} failed:\n{done.stderr[-3000:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        if report["status"] != "trained":
            raise RuntimeError(f"the fresh-process round {server_round} did not train: {report}")
        out[str(server_round)] = {"process_wall_s": round(wall, 2), **report}
    return out


def scale(work: Path, counts: tuple[int, ...], subjects: int, steps: int, batch: int) -> dict:
    out = {}
    for count in counts:
        yaml_paths = bench_sites(work, count, subjects)
        result = simulate_sites(yaml_paths, 1, steps, batch, work / f"scale-{count}")
        out[str(count)] = {
            "peak_rss_mib": result["peak_rss_mib"],
            "round_wall_s": result["records"][0].wall_s,
            "accepted": result["records"][0].accepted,
            "process_wall_s": result["wall_s"],
        }
    return out


# ---- sampling ------------------------------------------------------------------------------


def sampler_speedup(n: int, fast_steps: int = 20, ddpm_steps: int = 1000) -> dict:
    """DDPM (1000 steps) over DPM-Solver++ (20 steps) wall time, with modality adherence of each."""
    import numpy as np
    import torch

    from common.conditions import Conditions, Modality
    from common.evaluator import load_evaluator
    from common.metrics import adherence
    from common.model import load_ldm
    from common.prompts import conditions_to_vector
    from common.sampling import sample
    from common.weights import base_model_dir

    ldm, evaluator = load_ldm(base_model_dir()), load_evaluator()
    cycle = (Modality.T2w, Modality.FLAIR, Modality.PDw, Modality.T1w, Modality.T1ce)  # T1w/T1ce last: see README
    modalities = [cycle[i % len(cycle)] for i in range(n)]
    conditions = torch.stack(
        [conditions_to_vector(Conditions(modality=m, field_strength=1.5, slice_position=0.55)) for m in modalities]
    )
    requested = np.array([m.ordinal for m in modalities])
    out: dict = {}
    for name, sampler, steps in (("dpm++", "dpm++", fast_steps), ("ddpm", "ddpm", ddpm_steps)):
        start = time.perf_counter()
        images = sample(ldm, conditions, steps, 3.0, sampler, seed=0, batch_size=n)[:, 0].numpy()
        wall = time.perf_counter() - start
        out[name] = {
            "steps": steps,
            "wall_s": round(wall, 2),
            "modality_adherence": adherence(evaluator.predict(images)["modality"], requested),
        }
    out["speedup"] = round(out["ddpm"]["wall_s"] / out["dpm++"]["wall_s"], 1)
    out["samples"] = n
    return out


# ---- entry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSizes:
    """How much work each measurement does. `quick` takes about 2.5 minutes on 2 cores."""

    batch: int = 16
    step_repeats: int = 10
    memory_modes: tuple[str, ...] = MODES
    overhead_steps: int = 30
    sampler_samples: int = 10
    ddpm_steps: int = 1000
    scale_counts: tuple[int, ...] = (5, 20, 50)
    scale_subjects: int = 12
    scale_steps: int = 2
    multiplicity_repeats: int = 5
    signal_subjects: int = 12
    signal_repeats: int = 3
    fresh_rounds: int = 2
    fresh_subjects: int = 40  # with the policy's minimum batch 8: q = 8 / 32, as at a small hospital
    fresh_steps: int = 20
    calibration_accountant: str = "prv"  # the site policy's default

    @classmethod
    def quick(cls) -> BenchSizes:
        return cls(8, 3, ("attention",), 5, 2, 1000, (5,), 4, 1, 3, 12, 2, 2, 40, 5, "prv")


def run_bench(
    sizes: BenchSizes, work: Path | None = None, progress: Callable[[str], None] = print, device: str = "cpu"
) -> dict:
    """Every measurement, in one run, as one JSON-ready dict. The step timings run on `device`
    ("cpu" or "cuda"); federation, sampler and scale stages on the CPU."""
    work = work or Path(tempfile.mkdtemp(prefix="fedmri-bench-"))
    start = time.perf_counter()
    result: dict = {"sizes": asdict(sizes), "machine": {**machine(), "step_device": device}}
    stages: dict[str, float] = {}

    def stage(name: str, measure: Callable[[], dict]) -> dict:
        progress(name)
        began = time.perf_counter()
        value = measure()
        stages[name] = round(time.perf_counter() - began, 1)
        return value

    timing = stage("dp_step_timing", lambda: dp_step_timing(MODES, sizes.batch, sizes.step_repeats, device=device))
    memory = stage("dp_step_memory", lambda: step_memory(sizes.memory_modes, sizes.batch))
    result["dp_step_over_plain_step"] = {
        **{mode: {**timing[mode], "peak_memory": memory.get(mode)} for mode in MODES},
        "batch_size": sizes.batch,
        "default_mode": "attention",
    }
    # The default mode as sites run it: K slices x M draws per subject (run config defaults).
    from common.run_config import RunConfig

    k, m = RunConfig.slices_per_subject, RunConfig.noise_draws
    multiplicity = stage(
        "dp_step_timing_multiplicity",
        lambda: dp_step_timing((RunConfig.finetune_mode,), sizes.batch, sizes.multiplicity_repeats, k * m, device),
    )
    result["dp_step_over_plain_step_with_multiplicity"] = {
        **multiplicity[RunConfig.finetune_mode],
        "mode": RunConfig.finetune_mode,
        "subjects": sizes.batch,
        "slices_per_subject": k,
        "noise_draws": m,
        "rows": sizes.batch * k * m,
        "target_ratio": 1.3,
    }
    (signal_site,) = bench_sites(work, 1, sizes.signal_subjects)
    result["multiplicity_signal"] = stage(
        "multiplicity_signal", lambda: multiplicity_signal(signal_site, sizes.signal_subjects, sizes.signal_repeats)
    )
    result["upload_bytes_per_round"] = stage("upload_bytes_per_round", lambda: upload_bytes(MODES))
    result["federation_overhead"] = stage(
        "federation_overhead", lambda: federation_overhead(work, sizes.overhead_steps, 4, sizes.scale_subjects)
    )
    result["calibration"] = stage("calibration", lambda: calibration_search(sizes.calibration_accountant))
    result["fresh_process_rounds"] = stage(
        "fresh_process_rounds",
        lambda: fresh_process_rounds(work, sizes.fresh_rounds, sizes.fresh_steps, 8, sizes.fresh_subjects),
    )
    result["sampler_speedup"] = stage(
        "sampler_speedup", lambda: sampler_speedup(sizes.sampler_samples, ddpm_steps=sizes.ddpm_steps)
    )
    scaled = stage("scale", lambda: scale(work, sizes.scale_counts, sizes.scale_subjects, sizes.scale_steps, 4))
    result["scale"] = {**scaled, "scenario": "many-small"}
    result["stage_wall_s"] = stages
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["work_dir"] = str(work)
    return result


def _main() -> None:
    parser = argparse.ArgumentParser(description="fedmri bench worker processes (use `fedmri bench`).")
    parser.add_argument("--worker", choices=("memory", "simulate", "round"), required=True)
    parser.add_argument("--mode", default="attention")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dp", action="store_true")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--sites", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker == "memory":
        _memory_worker(args.mode, args.batch, args.dp, args.steps)
    elif args.worker == "round":
        _round_worker(args.sites, args.round, args.rounds, args.steps, args.batch)
    else:
        _simulate_worker(args.sites, args.rounds, args.steps, args.batch, args.out)


if __name__ == "__main__":
    _main()
