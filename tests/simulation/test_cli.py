"""The `fedmri` command line, run as a user would (in-process through typer's runner)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from common.evaluator import EvaluatorConfig
from common.pretrain_config import PretrainConfig
from common.run_config import RunConfig
from simulation.cli import app

runner = CliRunner()


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command and group under `command`, with the words that call it."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda path: " ".join(("fedmri", *path)))
def test_every_command_explains_itself_and_names_its_options(path: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})  # wide: no option name is wrapped
    assert result.exit_code == 0, result.output
    command = COMMANDS[path]
    if command.help:
        assert " ".join(command.help.split()[:3]) in " ".join(result.output.split())
    for param in command.params:
        names = param.opts if isinstance(param, click.Option) else [param.human_readable_name]
        assert any(name in result.output for name in names), f"{' '.join(path)} --help does not name {names}"


def test_sites_make_help_explains_the_bids_output() -> None:
    result = runner.invoke(app, ["sites", "make", "--help"])
    assert result.exit_code == 0
    assert "BIDS" in result.output and "--scenario" in result.output


# The options whose default is a typed config's: command -> (config, {option parameter: config field}).
FROM_CONFIG: dict[str, tuple[type, dict[str, str]]] = {
    "simulate": (RunConfig, {
        "rounds": "num_server_rounds", "local_steps": "local_steps", "batch_size": "batch_size",
        "learning_rate": "learning_rate", "mode": "finetune_mode", "strategy": "strategy", "base_model": "base_model",
        "resume": "resume", "min_train_nodes": "min_train_nodes", "client_dp": "client_dp",
        "client_dp_noise": "client_dp_noise", "client_dp_clip": "client_dp_clip",
        "slices_per_subject": "slices_per_subject", "noise_draws": "noise_draws", "device": "device",
    }),
    "demo": (RunConfig, {  # the demo's K, M and local steps are its own (simulation/cli.py says why)
        "rounds": "num_server_rounds", "mode": "finetune_mode", "learning_rate": "learning_rate",
    }),
    "evaluate": (RunConfig, {
        "samples": "eval_samples", "grid_samples": "eval_grid_samples", "steps": "eval_steps",
        "min_subjects": "eval_min_subjects", "seed": "seed", "device": "device",
    }),
    "pretrain": (PretrainConfig, {
        "vae_steps": "vae_steps", "unet_steps": "unet_steps", "batch_size": "batch_size",
        "max_minutes": "max_minutes", "prediction_type": "prediction_type", "seed": "seed", "randomize": "randomize",
        "source_branch": "source_branch",
    }),
    "train-evaluator": (EvaluatorConfig, {"steps": "steps", "batch_size": "batch_size", "seed": "seed",
                                          "randomize": "randomize"}),
}  # fmt: skip
# Other valid values for those fields: the CLI must follow the config wherever its defaults move.
MOVED = {"finetune_mode": "lora", "strategy": "fedprox", "client_dp": "fixed", "base_model": "elsewhere",
         "device": "cpu", "prediction_type": "v_prediction", "max_minutes": 7.5}  # fmt: skip
# Run in a fresh interpreter: each config's constructor fills in the moved defaults before the CLI is imported.
MOVE_AND_READ = """
import functools, json, sys
import typer
import common.evaluator, common.pretrain_config, common.run_config
moved = json.loads(sys.argv[1])
for module, name in ((common.run_config, "RunConfig"), (common.pretrain_config, "PretrainConfig"),
                     (common.evaluator, "EvaluatorConfig")):
    setattr(module, name, functools.partial(getattr(module, name), **moved[name]))
from simulation.cli import app
root = typer.main.get_command(app)
print(json.dumps({c: {p.name: p.default for p in root.commands[c].params} for c in sys.argv[2:]}, default=str))
"""


def _moved(config: type, field: str) -> object:
    value = getattr(config(), field)
    if field in MOVED:
        return MOVED[field]
    if isinstance(value, bool):
        return not value
    assert isinstance(value, int | float), f"{config.__name__}.{field}: add another valid value to MOVED"
    return value * 3 + 1


def test_cli_defaults_are_the_typed_configs_and_follow_them() -> None:
    root = typer.main.get_command(app)
    moved: dict[str, dict[str, object]] = {c.__name__: {} for c, _ in FROM_CONFIG.values()}
    for command, (config, fields) in FROM_CONFIG.items():
        defaults = {p.name: p.default for p in root.commands[command].params}
        for option, field in fields.items():
            assert defaults[option] == getattr(config(), field), f"fedmri {command} {option}: not {field}'s"
            moved[config.__name__][field] = _moved(config, field)
    RunConfig(**moved["RunConfig"])  # the moved defaults are a valid run config
    args = [sys.executable, "-c", MOVE_AND_READ, json.dumps(moved), *FROM_CONFIG]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    read = json.loads(done.stdout)
    for command, (config, fields) in FROM_CONFIG.items():
        for option, field in fields.items():
            assert read[command][option] == moved[config.__name__][field], (
                f"fedmri {command} {option}: typed out, not {field}'s"
            )


def test_help_loads_neither_flower_nor_diffusers() -> None:
    """`fedmri --help` imports every command module: they keep Flower and the model libraries lazy."""
    code = (
        "import sys\nfrom simulation.cli import app\nprint(sorted({'flwr', 'diffusers', 'opacus'} & set(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_sites_make_single_yaml_then_summary(tiny_sites: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["sites", "make", "--site", str(tiny_sites / "tiny-b.yaml"), "--subjects", "2", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny-b" / "participants.tsv").exists()
    assert (tmp_path / "tiny-b_contact_sheet.png").exists()
    result = runner.invoke(app, ["sites", "summary", "--json", str(tmp_path / "tiny-b.yaml")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tiny-b"]["subjects"] == 2


def test_unknown_scenario_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sites", "make", "--scenario", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown scenario 'nope'" in result.output and "demo" in result.output


def test_generate_writes_nifti_json_and_grid(tiny_base: Path, tmp_path: Path) -> None:
    import nibabel as nib

    out = tmp_path / "gen"
    args = [
        "generate",
        "--model",
        str(tiny_base),
        "--prompt",
        "axial FLAIR, 0.3T, glioma",
        "-n",
        "3",
        "--steps",
        "3",
        "--seed",
        "5",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    volume = nib.load(out / "samples.nii.gz")
    assert volume.shape == (64, 64, 3)  # slices stacked along the last axis
    records = json.loads((out / "samples.json").read_text())
    assert [r["modality"] for r in records] == ["FLAIR"] * 3 and records[0]["pathology"] == "glioma"
    assert {"modality", "pathology", "field_strength", "prompt", "seed", "guidance_scale"} <= set(records[0])
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"
    grid = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(tiny_base),
            "--grid",
            "--field",
            "0.3",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "grid"),
        ],
    )
    assert grid.exit_code == 0, grid.output
    assert nib.load(tmp_path / "grid" / "samples.nii.gz").shape[-1] == 5 * 4  # modalities x pathologies
    bad = runner.invoke(
        app, ["generate", "--model", str(tiny_base), "--prompt", "FLAIR banana", "--out", str(tmp_path / "bad")]
    )
    assert bad.exit_code == 2 and "unknown words" in bad.output


def test_evaluator_check_prints_the_confusion_on_labelled_scans(tiny_sites: Path, tmp_path: Path) -> None:
    import json
    import shutil

    # Arrange: a folder of "real" scans named <anything>_<modality>.nii.gz, plus a mask to skip.
    scans = sorted((tiny_sites / "tiny-a").glob("sub-*/anat/*.nii.gz"))
    t2 = next(p for p in scans if p.name.endswith("_T2w.nii.gz"))
    flair = next(p for p in scans if p.name.endswith("_FLAIR.nii.gz"))
    folder = tmp_path / "real"
    folder.mkdir()
    shutil.copy(t2, folder / "siteX_s1_T2w.nii.gz")
    shutil.copy(flair, folder / "siteX_s1_FLAIR.nii.gz")
    shutil.copy(flair, folder / "siteX_s1_lesionmask.nii.gz")
    # Act
    result = runner.invoke(app, ["evaluator", "check", "--real", str(folder), "--json", str(tmp_path / "c.json")])
    # Assert: both labelled files read, the mask skipped by name, the figures agree with the confusion.
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "modality confusion" in said and "skipped siteX_s1_lesionmask.nii.gz" in said
    record = json.loads((tmp_path / "c.json").read_text())
    confusion = record["confusion"]
    assert set(record["files"]) == {"siteX_s1_T2w.nii.gz", "siteX_s1_FLAIR.nii.gz"}
    assert sum(map(sum, confusion)) == record["slices"] > 0
    diagonal = sum(confusion[i][i] for i in range(len(confusion)))
    assert record["modality"] == diagonal / record["slices"]


def test_evaluator_check_with_no_labelled_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "scan_lesionmask.nii.gz").write_bytes(b"")
    result = runner.invoke(app, ["evaluator", "check", "--real", str(tmp_path)])
    assert result.exit_code == 2
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "no labelled NIfTI file" in said and "skipped: scan_lesionmask.nii.gz (no modality" in said


def test_release_vs_base_reports_the_mean_and_max_pixel_change(tmp_path: Path) -> None:
    import json

    import nibabel as nib
    import numpy as np

    from simulation.cli import _release_vs_base

    base = np.zeros((4, 4, 2), dtype=np.float32)
    release = base.copy()
    release[0, 0, 1] = 0.5  # one pixel of 32 changed by 0.5
    for name, volume in (("release", release), ("base", base)):
        (tmp_path / name).mkdir()
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / name / "samples.nii.gz")
    change = _release_vs_base(tmp_path / "release", tmp_path / "base", tmp_path / "change.json")
    assert change["mean_abs_change"] == 0.5 / 32 and change["max_abs_change"] == 0.5
    assert json.loads((tmp_path / "change.json").read_text()) == change


def test_simulate_site_yamls_are_checked_before_any_run(tiny_sites: Path, tmp_path: Path) -> None:
    """`fedmri simulate --site` names the YAML at fault, and refuses two sites with one id."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("site_id: x\n")
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "run"), "--site", str(broken)])
    output = "".join(result.output.split())  # rich wraps long lines anywhere, even inside a path
    assert result.exit_code == 2 and f"--site:{broken}:field'data'" in output, result.output
    twin = tmp_path / "twin.yaml"
    twin.write_text((tiny_sites / "tiny-a.yaml").read_text())
    args = ["simulate", "--out", str(tmp_path / "run"), "--site", str(tiny_sites / "tiny-a.yaml"), "--site", str(twin)]
    result = CliRunner().invoke(app, args)
    output = "".join(result.output.split())
    assert result.exit_code == 2 and f"--site{twin}:siteid'tiny-a'isalso" in output, result.output
    assert not (tmp_path / "run").exists()
