"""What fedmri shows in the terminal: its own progress, and every warning it has not understood.

Each filter below names one third-party message exactly and says why it is safe here; anything
else still shows. Flower's own log lines go to a file in the run directory (`flower_to_file`).
`FEDMRI_VERBOSE=1` (set by `--verbose`, inherited by Ray's workers and Flower's ClientApp
processes) turns every filter off and sends Flower's log to the terminal again.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

VERBOSE = "FEDMRI_VERBOSE"

# (category, message regex, why it is safe to hide)
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (
        UserWarning,
        r"Full backward hook is firing when gradients are computed with respect to module outputs since no "
        r"inputs require gradients",
        "Opacus's hooks on a UNet whose input (noisy latents) needs no gradient: the per-sample gradients are "
        "of parameters, and tests/common/test_finetune.py checks them against autograd in every mode",
    ),
    (
        UserWarning,
        r"Secure RNG turned off",
        "fedmri draws DP noise and sampling from its own os.urandom-keyed generators (client/secure_random.py), "
        "not from Opacus's",
    ),
    (
        DeprecationWarning,
        r"__array__ implementation doesn't accept a copy keyword",
        "diffusers' DPM-Solver builds its sigma table with np.array(tensor); the values are unchanged",
    ),
    (
        FutureWarning,
        r"Tip: In future versions of Ray, Ray will no longer override accelerator visible devices",
        "fedmri gives Ray every GPU share explicitly (simulation/engine.backend_config)",
    ),
)

# (logger, message regex, why): diffusers logs these through `logging`, not `warnings`.
KNOWN_LOG_LINES: tuple[tuple[str, str, str], ...] = (
    (
        "diffusers.models.modeling_utils",
        r"Cannot initialize model with low cpu memory usage because `accelerate` was not found",
        "the models are a few MB; loading them without accelerate costs nothing measurable",
    ),
    (
        "diffusers.models.modeling_utils",
        r"There are modules in \w+ that should be kept in float32: \[\]",
        "the list is empty: no module needs to stay in float32",
    ),
)


class _Drop(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class _RunLog(logging.FileHandler):
    """The run directory's flower.log (one at a time: a new run's replaces the previous run's)."""


def verbose() -> bool:
    return os.environ.get(VERBOSE, "") not in ("", "0")


def quiet_known_warnings() -> None:
    """Hide exactly the messages above (nothing when FEDMRI_VERBOSE is set). Safe to call twice."""
    if verbose():
        return
    for category, pattern, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, pattern, _ in KNOWN_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_Drop(pattern))


def flower_to_file(run_dir: Path) -> Path:
    """Flower's log (DEBUG and up) to run_dir/flower.log; the terminal keeps only its errors.

    With FEDMRI_VERBOSE set, the terminal keeps everything as well.
    """
    path = run_dir / "flower.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("flwr")
    for previous in [h for h in logger.handlers if isinstance(h, _RunLog)]:  # an earlier run's, in this process
        logger.removeHandler(previous)
        previous.close()
    handler = _RunLog(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    if not verbose():
        logger.propagate = False  # the root logger's handlers would print it again
        for console in logger.handlers:
            if not isinstance(console, logging.FileHandler):
                console.setLevel(logging.ERROR)
    return path
