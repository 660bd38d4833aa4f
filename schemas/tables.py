"""Arrow schemas of every table raee-ops reads or writes, defined once."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa

from raee_ops import __version__
from raee_ops.errors import ArtifactError

TEXT, TEXT_PAIR, LABEL, ID = "text", "text_pair", "label", "id"
#: The exit table's group of each reference row (build-db --group-column; null: a group of its own).
GROUP = "group_id"
TABLE_META_KEY = b"raee"
#: The key embedder's identity (TableMeta.key_fingerprint), beside the table's identity rather than in it: a release
#: before it refused table metadata with a field it did not know.
KEY_META_KEY = b"raee_key"
#: The fused strategy's settings, fitted on the table's own rows by build-db (raee_ops.calibration).
POLICY_META_KEY = b"raee_policy"
#: Per-layer probe heads and the key probe as JSON + base64 float32 arrays (raee_ops.probes), and the probe
#: strategies' fitted settings (raee_ops.probe_policy): in the exit table's own metadata, so they commit with it.
PROBES_META_KEY = b"raee_probes"
PROBE_POLICY_META_KEY = b"raee_probe_policy"
#: A `layer-N` key's standardization, fitted on the table's rows (raee_ops.layer_key): queries need the same one.
LAYER_KEY_META_KEY = b"raee_layer_key"
#: Pooled hidden states per layer: staged by build-db's workers (every view: input form × pooling), kept for the
#: probes' fit rows in the companion table `<table>__features` (the chosen view) so that append can refit the probes.
FEATURES = "features"
FEATURES_SUFFIX = "__features"
#: The companion's version written with this exit-table version: append reads exactly that one, so a rollback of the
#: exit table, or a run killed between the two writes, never pairs the table with another version's states.
FEATURES_VERSION_META_KEY = b"raee_features_version"
#: The build-db run that wrote this exit-table version (raee_ops.run_record): its id, mode and job (settings
#: and input files), so a retried append of the same job is known to be done.
RUN_META_KEY = b"raee_run"
#: The runs whose rows the version holds (its lineage), beside the run record rather than in it: a release before it
#: refused a run record with a field it did not know.
LINEAGE_META_KEY = b"raee_run_lineage"
#: The lineage's runs' records (mode, job, rejected rows) by run id, beside it for the same reason: a retried append
#: finds its job's rows held even once prune removed the version its killed run wrote.
LINEAGE_JOBS_META_KEY = b"raee_run_lineage_jobs"
#: Names a table may have: LanceDB's characters, no leading dot (a table is a folder `<name>.lance` in the database).
TABLE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
#: The forms a backbone can read an input in: the task's prompt (template, instruction and all), or the bare input (the
#: text, and the pair on the next line). The label-word head needs the prompt; probe heads read either, and on pair
#: tasks the bare input's states probe far better (build-db picks per table by cross-validation, raee_ops.probes).
FORMS = ("prompt", "bare")
#: How a layer's hidden states become one vector per row, in the order pooled arrays hold them: the mean over the
#: prompt's real tokens, and the readout token (where the label-word head reads).
POOLINGS = ("mean", "readout")
#: The pooled vectors build-db stages per layer and row in its `features` column: every form × pooling
#: (raee_ops.probes.VIEWS names them).
VIEWS_STAGED = len(FORMS) * len(POOLINGS)


def table_name_problem(name: str) -> str | None:
    """Why `name` cannot name an exit table (None: it can). Checked before any work: LanceDB refuses a bad name only
    when the table is written, and `<table>__features` is build-db's companion of `<table>`, never a table of its
    own (built or rolled back alone, it would no longer match its exit table)."""
    if not TABLE_NAME.fullmatch(name):
        return f"table name {name!r} may hold only letters, digits, '_', '-' and '.', and not start with '.'"
    if name.endswith(FEATURES_SUFFIX):
        return f"table name {name!r} ends in {FEATURES_SUFFIX!r}, which names build-db's companion of a table"
    return None


#: Rejected rows, from any pipeline: the row's id (or its position in its file when it has none), why, and the
#: input file it came from.
ERRORS_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("reason", pa.string()), pa.field("file", pa.string())])

#: The label-word head's columns of the exit table, which a backbone without a label-word head does not have.
HEAD_COLUMNS = ("layer_pred", "layer_correct", "layer_prob", "layer_logprobs", "first_correct_layer")

#: Columns classify adds to every input row.
PREDICTION_FIELDS = [
    pa.field("prediction", pa.int64()),
    pa.field("prediction_label", pa.string()),
    pa.field("exit_layer", pa.int32()),  # 1-based; 0: no exit layer (only a layer-N key's layers ran)
    pa.field("confidence", pa.float32()),
]


#: evaluate's predictions.parquet: each scored row's answer and exit layer under every strategy it scored (the
#: baselines' included), one row per (row, strategy), so the columns never depend on which strategies ran. Answers
#: are label indices; the file's metadata holds the label names under `label_names`, as the bench datasets do.
EVALUATION_PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("label", pa.int32()),
        pa.field("strategy", pa.string()),
        pa.field("prediction", pa.int64()),
        pa.field("exit_layer", pa.int32()),  # as classify's: 0 no exit layer
    ]
)


def exit_table_schema(dim: int, num_layers: int, num_labels: int, label_word_head: bool = True) -> pa.Schema:
    """One row per reference example: its key and what every layer predicted (layers 1-based in values), through
    the label-word head (layer_*; absent, no columns at all, for a backbone without one) and through the probe
    heads, out of fold (probe_*)."""
    fields = layer_rows_fields(dim, num_layers, num_labels)
    return pa.schema(
        [f for f in fields if label_word_head or f.name not in HEAD_COLUMNS]
        + [
            pa.field("probe_correct", pa.list_(pa.bool_(), num_layers)),
            # log-softmax of each layer's probe, row-major L×C, out-of-fold (or from a probe that never saw the row)
            pa.field("probe_logprobs", pa.list_(pa.float32(), num_layers * num_labels)),
            # rows of one group (near-copies: phrases of one sentence, one document's parts) never vouch for each
            # other when build-db fits the probes and policies; kept so that append refits the same way
            pa.field(GROUP, pa.string()),
        ]
    )


def layer_rows_fields(dim: int, num_layers: int, num_labels: int) -> list[pa.Field]:
    return [
        pa.field("id", pa.string()),
        pa.field("label", pa.int32()),
        pa.field("vector", pa.list_(pa.float32(), dim)),
        pa.field("layer_pred", pa.list_(pa.int32(), num_layers)),
        pa.field("layer_correct", pa.list_(pa.bool_(), num_layers)),
        pa.field("layer_prob", pa.list_(pa.float32(), num_layers)),
        # log-softmax over labels at every layer, row-major L×C: lets strategies recalibrate without rerunning.
        pa.field("layer_logprobs", pa.list_(pa.float32(), num_layers * num_labels)),
        pa.field("first_correct_layer", pa.int32(), nullable=True),
    ]


def layer_rows_schema(dim: int, num_layers: int, num_labels: int, hidden: int) -> pa.Schema:
    """What build-db's workers stage per row: the head's exit information and every layer's pooled states in every
    view (L×VIEWS×H float16, row-major), from which the driver fits the probes."""
    features = pa.field(FEATURES, pa.list_(pa.float16(), num_layers * VIEWS_STAGED * hidden))
    return pa.schema(layer_rows_fields(dim, num_layers, num_labels) + [features])


def features_schema(num_layers: int, hidden: int) -> pa.Schema:
    """`<table>__features`: the probes' fit rows' pooled states in the chosen view, L×H float16."""
    return pa.schema([pa.field("id", pa.string()), pa.field(FEATURES, pa.list_(pa.float16(), num_layers * hidden))])


def flat_values(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size list column's values as one flat array (reshape to rows × size at the caller)."""
    return table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)


def known_fields(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """`raw`'s fields that dataclass `cls` has: a field a later release records is not this release's to read."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def stored_fields(cls: type, raw: dict[str, Any], what: str) -> dict[str, Any]:
    """`raw`, a fitted rule or head as a table stores it, refused where it holds a field dataclass `cls` lacks: a
    field a later release added changes what the rule does, so this release must not run the rest of it."""
    unknown = sorted(raw.keys() - known_fields(cls, raw).keys())
    if unknown:
        raise ArtifactError(
            f"the table's {what} holds {', '.join(unknown)}, which raee-ops {__version__} does not know: a newer "
            "release built it; run that release, or rebuild the table with this one"
        )
    return raw


def fixed_list(values: np.ndarray, field: pa.Field) -> pa.FixedSizeListArray:
    """`values`, rows × … in C order, as `field`'s fixed-size list column (its value type): flat_values' inverse."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), field.type.value_type), field.type.list_size)


@dataclass(frozen=True)
class TableMeta:
    """Identity of an exit-metadata table; classify refuses a table whose identity differs from its run."""

    fingerprint: str
    task: str
    embedder: str
    num_layers: int
    label_names: list[str]
    #: TaskEntry.fingerprint; None in tables built before it was recorded (they are checked without it)
    task_fingerprint: str | None = None
    #: Manifest.key_fingerprint of the embedder the keys were made with (None: the backbone's own keys, which its
    #: fingerprint covers, or a table built before it was recorded)
    key_fingerprint: str | None = None

    def encode(self) -> dict[bytes, bytes]:
        identity = asdict(self)
        key = identity.pop("key_fingerprint")
        return {TABLE_META_KEY: json.dumps(identity).encode()} | ({KEY_META_KEY: key.encode()} if key else {})

    @classmethod
    def decode(cls, schema: pa.Schema) -> TableMeta | None:
        """The table's identity; fields a later release records are ignored (it says so where it matters)."""
        metadata = schema.metadata or {}
        raw = metadata.get(TABLE_META_KEY)
        if not raw:
            return None
        key = metadata.get(KEY_META_KEY)
        return cls(**{**known_fields(cls, json.loads(raw)), "key_fingerprint": key.decode() if key else None})


def encode_array(array: np.ndarray) -> dict:
    """A float32 array as table metadata holds it (probes, a layer key's standardization): plain JSON, never a
    pickle, so a database cannot run code in a worker."""
    a = np.ascontiguousarray(array, np.float32)
    return {"shape": list(a.shape), "f32": base64.b64encode(a.tobytes()).decode()}


def decode_array(raw: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(raw["f32"]), np.float32).reshape(raw["shape"])
