"""Shared fixtures: a tiny Llama exported (tasks sst2 and rte) and verified once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import build_tiny_llama

from raee_ops.tasks import PRESETS


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def tiny_llama_artifacts(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported, verified artifacts directory of the tiny Llama with tasks sst2 and rte."""
    from pipelines.export import run_export

    out = tmp_path_factory.mktemp("tiny-llama-artifacts") / "artifacts"
    run_export(
        str(tiny_llama_dir),
        out,
        [PRESETS["sst2"], PRESETS["rte"]],
        verify=True,
        embedders=[],
        max_length=128,
        beam_args=[],
    )
    return out
