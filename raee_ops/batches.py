"""One batch of validated rows through the model, as every command runs it: a worker loads the runtime (and for
classify the retriever) once, then runs Arrow batches. pipelines/inference.py runs these as Beam model handlers;
evaluate runs `LayerRows` in its own process.

A row that fails where its batch's other rows run becomes an error row (`run` isolates it); a failure no row of a
batch escapes is the worker's or the artifacts', never the rows', and fails the job (exit 1, nothing published), as
does any other exception: rows are never rejected for a broken worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from raee_ops import storage
from raee_ops.artifacts import local_artifacts
from raee_ops.calibration import log_softmax
from raee_ops.errors import ArtifactError, ArtifactsChanged, RaeeError, RaeeRunError, first_line
from raee_ops.exit_policy import Context, Neighbours, Strategy, resolve
from raee_ops.faults import fault_point
from raee_ops.key_names import key_width, layer_depth
from raee_ops.probes import table_views, view_form
from raee_ops.progress import WorkerProgress
from raee_ops.readout import answer_batch
from raee_ops.retrieval import Retriever, table_context
from raee_ops.rows import ROW_ID, internal_errors, output_rows, unjoinable
from raee_ops.runtime import SegmentRuntime, mean_states
from raee_ops.schemas.manifest import MANIFEST_NAME, Manifest
from raee_ops.schemas.tables import (
    FEATURES,
    FORMS,
    LABEL,
    PREDICTION_FIELDS,
    TEXT,
    TEXT_PAIR,
    fixed_list,
    layer_rows_schema,
)
from raee_ops.tasks import Task


class Outcome(NamedTuple):
    rows: pa.Table
    errors: pa.Table


@dataclass
class Loaded:
    """What a worker holds: the runtime, its progress line, and for classify the retriever, the strategy and the
    table's context (its probes and policy)."""

    runtime: SegmentRuntime
    retriever: Retriever | None = None
    strategy: Strategy | None = None
    context: Context | None = None
    progress: WorkerProgress = field(default_factory=WorkerProgress)


class BatchWork:
    """What a command does with one batch of validated rows (`run`): reject overlong prompts, `predict`, isolate
    rows that fail. A subclass says what loading means and what `predict` answers."""

    command = ""  # the raee-ops command this work serves (progress lines, fault points)

    def __init__(
        self,
        artifacts: str,
        task: Task,
        embedder: str,
        threads: int | None = None,
        providers: str | None = None,
        filesystem: dict[str, Any] | None = None,
        checked: Manifest | None = None,
    ) -> None:
        """`checked`: the manifest the launching process checked against the table; a worker refuses artifacts
        that differ from it in anything this run reads (Manifest.identity)."""
        self.artifacts, self.task, self.embedder = artifacts, task, embedder
        self.threads, self.providers, self.filesystem = threads, providers, filesystem
        self.identity = checked.identity(task.name, embedder) if checked else None

    def _runtime(self) -> SegmentRuntime:
        fault_point(f"load:{self.command}")
        storage.on_worker(self.filesystem)
        if unseen := storage.unseen(self.artifacts, "--artifacts"):
            raise unseen
        directory = local_artifacts(self.artifacts)  # fetched into this worker's cache when not local
        try:
            runtime = SegmentRuntime(directory, providers=self.providers, intra_op_threads=self.threads)
        except ArtifactError as exc:
            if self.identity and not (directory / MANIFEST_NAME).is_file():  # the run's checks read one
                raise ArtifactsChanged(
                    f"the artifacts at {self.artifacts} lost their manifest during the run ({first_line(exc)}): an "
                    "export publishing there? run again once it is in place"
                ) from exc
            raise
        if self.identity:
            self._check_unchanged(runtime.manifest)
        return runtime

    def _check_unchanged(self, found: Manifest) -> None:
        """Refuse artifacts an export replaced after the run's checks: the run would answer with another model."""
        identity = found.identity(self.task.name, self.embedder)  # an export without the task raises here
        changed = [
            f"{part} {identity.get(part, 'missing')[:12]}, checked {want[:12]}"
            for part, want in self.identity.items()
            if identity.get(part) != want
        ]
        if changed:
            raise ArtifactsChanged(
                f"the artifacts at {self.artifacts} changed during the run ({'; '.join(changed)}): run again once "
                "the new export is in place"
            )

    def load(self) -> Loaded:
        """What a worker holds while it runs batches (once per worker: Beam shares it)."""
        raise NotImplementedError

    def predict(self, model: Loaded, table: pa.Table, prompts: list[str]) -> pa.Table:
        raise NotImplementedError

    def run(self, table: pa.Table, model: Loaded) -> Outcome:
        """The batch's answered rows and its rejected rows, with their reasons (rows in = rows out + rejected)."""
        runtime = model.runtime
        refused, why = self.refused(table)
        errors = [internal_errors(table.filter(pa.array(refused)), [why] * int(refused.sum()))]
        table = table.filter(pa.array(~refused))
        prompts = self.prompts(runtime, table, self.form(model))
        # the length check's ids are the ones the layers run; where no layer runs a prompt, nothing is checked
        known = runtime.encoded_by_prompt(prompts) if self.runs_backbone(model) else {}
        lengths = np.array([len(known.get(p, ())) for p in prompts], np.int64)
        limit = runtime.manifest.max_length
        fits = lengths <= limit
        errors.append(
            internal_errors(
                table.filter(pa.array(~fits)),
                [
                    f"prompt is {n} tokens, over max_length {limit} (never truncated: the answer is read at its "
                    "end; export-onnx --max-length raises the limit)"
                    for n in lengths[~fits]
                ],
            )
        )
        table = table.filter(pa.array(fits))
        prompts = [p for p, ok in zip(prompts, fits, strict=True) if ok]
        with runtime.reusing(known):
            rows, failed = self.predicted(model, table, prompts)
        errors += failed
        errors_out = pa.concat_tables(errors)
        rows_out = pa.concat_tables(rows) if rows else self.empty(model)
        model.progress.add(rows_out.num_rows + errors_out.num_rows, self.command)
        fault_point(f"batch:{self.command}")
        return Outcome(rows_out, errors_out)

    def predicted(self, model: Loaded, table: pa.Table, prompts: list[str]) -> tuple[list[pa.Table], list[pa.Table]]:
        """(`predict`'s tables, error tables): a batch that fails is retried row by row, so one offending row
        becomes an error with its reason and the rest are kept. A raee-ops error (the table unreadable or pruned,
        the store failing, the artifacts changed) is no row's doing: it fails the job, even where it cleared before
        the retries ended, and never turns rows into rejections."""
        try:
            return ([self.predict(model, table, prompts)] if table.num_rows else []), []
        except RaeeError:
            raise
        except Exception as batch_failure:
            rows, failed = [], []
            for i in range(table.num_rows):
                try:
                    rows.append(self.predict(model, table.slice(i, 1), prompts[i : i + 1]))
                except RaeeError:
                    raise
                except Exception as exc:  # becomes this row's error reason
                    failed.append(internal_errors(table.slice(i, 1), [f"inference failed: {exc!r}"]))
            if not rows:  # no row runs: the artifacts or the worker are broken, not the rows; the job fails
                raise RaeeRunError(f"inference failed on every row of a batch: {batch_failure!r}") from batch_failure
            if self.runs_backbone(model) and not any(self.ran_layers(model, r) for r in rows):  # the same, where
                # the rows kept are those answered without running a layer (retrieval's exit 0)
                raise RaeeRunError(
                    f"inference failed on every row of a batch that runs a layer: {batch_failure!r}"
                ) from batch_failure
            return rows, failed

    def ran_layers(self, model: Loaded, rows: pa.Table) -> bool:
        """Whether answering these rows (`predict`'s table) ran the backbone: every row that build-db's and evaluate's
        layer rows answer does."""
        return True

    def exit_layers(self, rows: pa.Table) -> np.ndarray | None:
        """Each answered row's exit layer, for the run's counters (None: this work runs every layer)."""
        return None

    def refused(self, table: pa.Table) -> tuple[np.ndarray, str]:
        """Rows this command cannot write whatever the model answers, and why: none but in classify."""
        return np.zeros(table.num_rows, bool), ""

    def form(self, model: Loaded) -> str:
        """The input form (schemas.tables.FORMS) of the texts checked for length and handed to `predict`."""
        return "prompt"

    def runs_backbone(self, model: Loaded) -> bool:
        """Whether `predict` runs the rows' prompts through the backbone, which refuses those over max_length."""
        return True

    def prompts(self, runtime: SegmentRuntime, table: pa.Table, form: str) -> list[str]:
        texts = table.column(TEXT).to_pylist()
        pairs = table.column(TEXT_PAIR).to_pylist() if self.task.is_pair else [None] * len(texts)
        return [self.task.render(t, p, runtime.suffix, form) for t, p in zip(texts, pairs, strict=True)]

    def keys(self, runtime: SegmentRuntime, table: pa.Table) -> np.ndarray:
        return runtime.key(self.embedder, *self.task.key_inputs(table))

    def empty(self, model: Loaded) -> pa.Table:
        raise NotImplementedError


class LayerRows(BatchWork):
    """Labelled rows -> layer rows: the key, every layer's head prediction, correctness and log-probs, and every
    layer's pooled hidden states in every view (the probes' features; build-db's driver turns these into exit-table
    rows). The prompt's pass gives the head's answers; each other input form of the views the caller reads is one
    more all-layer pass, for the probes only (and the only one where nothing reads the prompt's, `form`); views of a
    form not run stage zeros."""

    def __init__(
        self,
        artifacts: str,
        task: Task,
        embedder: str,
        views: Sequence[str] | None = None,
        command: str = "build-db",
        **runtime_options: Any,
    ) -> None:
        """`views`: the views the caller reads of the staged states (default: every view a new table's probes may
        choose, probes.table_views); only their input forms are run. `command`: the one it serves (evaluate runs
        every layer too), for its progress lines and fault points."""
        super().__init__(artifacts, task, embedder, **runtime_options)
        self.command = command
        self.forms = {view_form(view) for view in (views or table_views(embedder))}

    def load(self) -> Loaded:
        return Loaded(self._runtime())

    def form(self, model: Loaded) -> str:
        """The prompt, unless nothing reads its pass: a backbone without a label-word head, keyed by an embedder,
        whose views read one other form only (a bare encoder's table whose probes chose the bare input). Its pass
        would be wasted, and its length check would refuse rows the form read fits, which classify answers."""
        if model.runtime.manifest.label_word_head or layer_depth(self.embedder) or len(self.forms) > 1:
            return "prompt"
        (form,) = self.forms
        return form

    def schema(self, m: Manifest) -> pa.Schema:
        return layer_rows_schema(key_width(m, self.embedder), m.num_layers, len(self.task.label_names), m.hidden_size)

    def empty(self, model: Loaded) -> pa.Table:
        return self.schema(model.runtime.manifest).empty_table()

    def predict(self, model: Loaded, table: pa.Table, prompts: list[str]) -> pa.Table:
        runtime, read = model.runtime, self.form(model)
        # the head's logits come from the pass over `prompts` (zeros where it is not the prompt's: no head then)
        logits, pooled = runtime.all_layers_pooled(self.task.name, prompts)
        passes = {read: pooled} | {
            form: runtime.all_layers_pooled(self.task.name, self.prompts(runtime, table, form))[1]
            for form in self.forms - {read}
        }
        # L×B×VIEWS×H: each form's poolings, FORMS in order; zeros for a form nothing reads
        staged = np.concatenate([passes.get(form, np.zeros_like(pooled)) for form in FORMS], axis=2)
        logprobs = log_softmax(logits).transpose(1, 0, 2)  # B×L×C
        labels = table.column(LABEL).to_numpy()
        pred = logprobs.argmax(axis=2)
        correct = pred == labels[:, None]
        first = np.where(correct.any(axis=1), correct.argmax(axis=1) + 1, 0)
        depth = layer_depth(self.embedder)  # a layer key's state is here already; the driver standardizes it
        keys = mean_states(pooled[depth - 1]) if depth else self.keys(runtime, table)
        schema = self.schema(runtime.manifest)
        n, layers = len(labels), runtime.num_layers

        def fixed(values: np.ndarray, field: str) -> pa.Array:
            return fixed_list(values, schema.field(field))

        return (
            pa.Table.from_arrays(
                [
                    table.column(ROW_ID).combine_chunks(),
                    pa.array(labels, pa.int32()),
                    fixed(keys, "vector"),
                    fixed(pred.astype(np.int32), "layer_pred"),
                    fixed(correct, "layer_correct"),
                    fixed(np.exp(np.take_along_axis(logprobs, labels[:, None, None], axis=2)), "layer_prob"),
                    fixed(logprobs.reshape(n, -1), "layer_logprobs"),
                    pa.array(first, pa.int32(), mask=first == 0),
                    fixed(staged.transpose(1, 0, 2, 3), FEATURES),
                ],
                schema=schema,
            )
            if n and layers
            else schema.empty_table()
        )


class Classify(BatchWork):
    """Input rows -> the same rows plus prediction, label, 1-based exit layer and confidence."""

    command = "classify"

    def __init__(
        self,
        artifacts: str,
        task: Task,
        embedder: str,
        db_uri: str,
        table: str,
        k: int,
        strategy: str,
        output_schema: pa.Schema,
        version: int | None = None,
        layer_budget: float | None = None,
        layer_price: float | None = None,
        storage_options: dict[str, str] | None = None,
        **runtime_options: Any,
    ) -> None:
        super().__init__(artifacts, task, embedder, **runtime_options)
        self.db_uri, self.table, self.k, self.strategy = db_uri, table, k, strategy
        self.output_schema, self.version, self.storage_options = output_schema, version, storage_options
        self.layer_budget, self.layer_price = layer_budget, layer_price

    def load(self) -> Loaded:
        runtime = self._runtime()
        strategy = resolve(self.strategy, runtime.num_layers)
        retriever = Retriever(self.db_uri, self.table, self.version, self.storage_options)  # the driver's version
        context = table_context(
            retriever.table.schema,
            runtime.num_layers,
            len(self.task.label_names),
            self.k,
            self.layer_budget,
            self.layer_price,
        )
        return Loaded(runtime, retriever, strategy, context)

    def empty(self, model: Loaded) -> pa.Table:
        return self.output_schema.empty_table()

    def refused(self, table: pa.Table) -> tuple[np.ndarray, str]:
        return unjoinable(table)

    def form(self, model: Loaded) -> str:
        return model.strategy.form(model.context)

    def runs_backbone(self, model: Loaded) -> bool:
        return model.strategy.runs_backbone(model.context)

    def ran_layers(self, model: Loaded, rows: pa.Table) -> bool:
        """A layer key runs its layers for every row, exit 0 included."""
        return model.context.key_depth > 0 or bool(self.exit_layers(rows).any())

    def exit_layers(self, rows: pa.Table) -> np.ndarray:
        return rows.column("exit_layer").to_numpy()

    def predict(self, model: Loaded, table: pa.Table, prompts: list[str]) -> pa.Table:
        runtime, strategy, context = model.runtime, model.strategy, model.context
        wanted = strategy.neighbours(context)
        start = runtime.prefix(prompts, context.key_depth) if wanted and context.key_depth else None
        if not wanted:
            neighbours = Neighbours.none(table.num_rows, context.num_layers, context.num_labels)
        else:
            keys = mean_states(start.pooled) if start else self.keys(runtime, table)
            neighbours = model.retriever.search(keys, wanted)
        probs, exits = answer_batch(runtime, self.task.name, prompts, strategy, neighbours, context, start)
        prediction = probs.argmax(axis=1)
        added = [
            pa.array(prediction, pa.int64()),
            pa.array([self.task.label_names[i] for i in prediction], pa.string()),
            pa.array(exits, pa.int32()),
            pa.array(probs.max(axis=1), pa.float32()),
        ]
        out = output_rows(table)
        for spec, values in zip(PREDICTION_FIELDS, added, strict=True):
            out = out.append_column(spec, values)
        return out.cast(self.output_schema)
