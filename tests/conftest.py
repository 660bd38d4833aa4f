"""Shared fixtures: a tiny Llama exported (tasks sst2 and rte) and verified once per test session."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
from tiny_models import build_tiny_llama

from raee_ops.tasks import PRESETS


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def tiny_llama_artifacts(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported, verified artifacts directory of the tiny Llama with tasks sst2 and rte."""
    from raee_ops.pipelines.export import run_export

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


#: The longest test files (one to six minutes each on 2 cores), longest first. pytest-xdist (`make test`: --dist
#: loadfile --no-loadscope-reorder) hands out files in collection order as workers free up; its default order (most
#: tests first) left test_wheel, two tests and a minute or more, to run last while the other worker sat idle.
LONGEST_FIRST = (
    "test_failures.py",
    "test_faults.py",
    "test_object_store.py",
    "test_runners.py",
    "test_wheel.py",
    "test_decoder_export.py",
    "test_pipelines.py",
    "test_probe_pipelines.py",
    "test_evaluate.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first (each file's tests keep their order), so the workers finish together."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


class FaultRecord(NamedTuple):
    command: str
    point: str
    reruns: int
    lost: int
    duplicated: int


FAULT_RECORDS: list[FaultRecord] = []


@pytest.fixture(scope="session")
def fault_records() -> list[FaultRecord]:
    """Where the fault-injection tests record each kill, for the summary printed at the end."""
    return FAULT_RECORDS


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Under pytest-xdist (`make test` runs two workers) each worker hands its kill records to the controller."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["fault_records"] = [tuple(r) for r in FAULT_RECORDS]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """The xdist controller's side of `pytest_sessionfinish`: gather every worker's records for the summary."""
    FAULT_RECORDS.extend(FaultRecord(*r) for r in node.workeroutput.get("fault_records", []))


def pytest_terminal_summary(terminalreporter) -> None:
    if not FAULT_RECORDS:
        return
    lost, duplicated = sum(r.lost for r in FAULT_RECORDS), sum(r.duplicated for r in FAULT_RECORDS)
    terminalreporter.section("fault injection")
    for r in FAULT_RECORDS:
        line = f"{r.command:>18} killed at {r.point:<30} reruns {r.reruns}  lost {r.lost}  duplicated {r.duplicated}"
        terminalreporter.line(line)
    terminalreporter.line(
        f"points killed: {len(FAULT_RECORDS)}, reruns: {sum(r.reruns for r in FAULT_RECORDS)}, "
        f"rows lost: {lost}, rows duplicated: {duplicated}"
    )
