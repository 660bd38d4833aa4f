"""Beam pipeline construction shared by every pipeline.

The DirectRunner of recent Beam first tries to download and start the Prism runner; this machine (and many
batch hosts) have no internet, so a local run goes straight to the FnApiRunner that DirectRunner falls back to.
`--direct_num_workers` and `--direct_running_mode` keep working; any other runner name is passed through.
"""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

LOCAL_RUNNERS = {None, "DirectRunner", "direct", "FnApiRunner"}


def make_pipeline(beam_args: Sequence[str] = ()) -> beam.Pipeline:
    options = PipelineOptions(list(beam_args))
    runner_name = options.view_as(StandardOptions).runner
    if runner_name in LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)
