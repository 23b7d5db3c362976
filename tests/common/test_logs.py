"""Quiet by default: exactly the understood third-party messages are hidden, everything else shows."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from common.logs import KNOWN_LOG_LINES, KNOWN_WARNINGS, VERBOSE, flower_to_file, quiet_known_warnings

SAMPLES = {
    r"Full backward hook": "Full backward hook is firing when gradients are computed with respect to module outputs "
    "since no inputs require gradients. See https://docs.pytorch.org for more details.",
    r"Secure RNG": "Secure RNG turned off. This is perfectly fine for experimentation.",
    r"__array__": "__array__ implementation doesn't accept a copy keyword, so passing copy=False failed.",
    r"Tip: In future": "Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var",
}


def _shown(category: type[Warning], message: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn(message, category, stacklevel=1)
    return bool(caught)


def test_each_known_warning_is_hidden_and_a_near_miss_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VERBOSE, raising=False)
    assert len(SAMPLES) == len(KNOWN_WARNINGS)
    for category, pattern, why in KNOWN_WARNINGS:
        (sample,) = [text for key, text in SAMPLES.items() if pattern.startswith(key)]
        assert not _shown(category, sample), pattern
        assert _shown(RuntimeWarning if category is not RuntimeWarning else UserWarning, sample), pattern
        assert why  # each filter says why it is safe
    assert _shown(UserWarning, "Full backward hook is firing on inputs that DO require gradients")
    assert _shown(DeprecationWarning, "some other numpy deprecation")


def test_verbose_hides_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VERBOSE, "1")
    for category, pattern, _ in KNOWN_WARNINGS:
        (sample,) = [text for key, text in SAMPLES.items() if pattern.startswith(key)]
        assert _shown(category, sample)


def test_known_diffusers_lines_are_dropped_and_others_kept(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(VERBOSE, raising=False)
    quiet_known_warnings()
    name = KNOWN_LOG_LINES[0][0]
    log = logging.getLogger(name)
    with caplog.at_level(logging.WARNING, logger=name):
        log.warning("Cannot initialize model with low cpu memory usage because `accelerate` was not found in the env")
        log.warning("There are modules in AutoencoderKL that should be kept in float32: [].")
        log.warning("There are modules in AutoencoderKL that should be kept in float32: ['norm'].")
        log.warning("a message fedmri has never seen")
    assert [r.getMessage() for r in caplog.records] == [
        "There are modules in AutoencoderKL that should be kept in float32: ['norm'].",
        "a message fedmri has never seen",
    ]


def test_flowers_log_goes_to_the_run_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(VERBOSE, raising=False)
    logger = logging.getLogger("flwr")
    saved = (logger.level, logger.propagate, list(logger.handlers), [h.level for h in logger.handlers])
    try:
        path = flower_to_file(tmp_path / "run")
        logger.debug("Constructed ActorPool with: 2 actors")
        for handler in logger.handlers:
            handler.flush()
        assert "Constructed ActorPool" in path.read_text()
        second = flower_to_file(tmp_path / "second-run")  # a second run in the same process
        logger.debug("Terminated RayBackend")
        for handler in logger.handlers:
            handler.flush()
        assert "Terminated RayBackend" in second.read_text() and "Terminated" not in path.read_text()
        consoles = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
        assert all(h.level >= logging.ERROR for h in consoles) and not logger.propagate
    finally:
        for handler in logger.handlers[:]:
            if handler not in saved[2]:
                logger.removeHandler(handler)
                handler.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        for handler, level in zip(saved[2], saved[3], strict=True):
            handler.setLevel(level)
