"""One batch through a strategy: its exits, the layers up to them, and its answer (classify's core, also timed by
bench/speed.py). Strategies reading probes get each row's probe at the layer it left at, and a confidence stop
where the strategy has one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raee_ops.calibration import FusedPolicy, reaches
from raee_ops.exit_policy import Context, Neighbours, Strategy, unfitted
from raee_ops.probe_policy import ProbePolicy
from raee_ops.probes import ProbeSet
from raee_ops.runtime import Prefix, SegmentRuntime, StopFn


def stop_rule(strategy: Strategy, ctx: Context) -> StopFn | None:
    """Rows may leave at a layer whose probe's top probability reaches the strategy's threshold."""
    t = strategy.threshold(ctx)
    if t is None:
        return None
    probes = ctx.fitted_probes()

    def stop(layer: int, pooled: np.ndarray) -> np.ndarray:
        return reaches(np.exp(probes.layers[layer - 1].log_probs(pooled[:, probes.pool_index]).max(axis=1)), t)

    return stop


def read_out(
    runtime: SegmentRuntime,
    task: str,
    prompts: Sequence[str],
    exits: np.ndarray,
    strategy: Strategy,
    ctx: Context,
    start: Prefix | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(what the strategy reads B×C: head logits or probe log-probs, the 1-based layer each row left at); with
    `start` (a layer key's prefix) rows continue from there."""
    readout = runtime.run_to_exit_pooled(task, prompts, exits, stop_rule(strategy, ctx), start)
    if strategy.reads == "probe":
        return ctx.fitted_probes().layer_log_probs(readout.pooled, readout.exits), readout.exits
    return readout.logits, readout.exits


def answer_batch(
    runtime: SegmentRuntime,
    task: str,
    prompts: Sequence[str],
    strategy: Strategy,
    nb: Neighbours,
    ctx: Context,
    start: Prefix | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(label probabilities B×C, the 1-based layer each row left at; 0: no layer run, or only a layer key's)."""
    logits, exits = read_out(runtime, task, prompts, strategy.exits(nb, ctx), strategy, ctx, start)
    return strategy.answer(logits, exits, nb, ctx), exits


def describe(
    strategy: Strategy,
    policy: FusedPolicy | None,
    probe_policy: ProbePolicy | None,
    probes: ProbeSet | None,
    neighbours: str,
) -> str:
    """The settings a strategy runs with, as classify prints them (`neighbours`: --k as the run uses it); for one
    reading probes, the input form it runs."""
    if strategy.needs_policy and policy is not None:
        return f"fitted on the table for {policy.metric}: {policy.settings()}"
    reads = (
        f"; probes: {probes.pooling} view, run on the {probes.form} input"
        if probes and strategy.reads == "probe"
        else ""
    )
    if strategy.needs_probe_policy:
        if probe_policy is None:
            raise unfitted("probe policy", reader=strategy.name)
        fitted = probe_policy.settings() if strategy.needs_retrieval else probe_policy.conf_settings()
        return f"fitted on the table for {probe_policy.metric}: {fitted}{reads}"
    if strategy.reads_key_probe:  # its one neighbour only carries the key: --k is not read
        return "the probe on the retrieval key" + reads
    return (neighbours if strategy.needs_retrieval else "no retrieval") + reads
