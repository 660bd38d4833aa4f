"""Tasks: a prompt template, label names and a verbalizer (one word per label).

A template uses `{text}` (and `{text_pair}` for pair tasks) and ends where the label word would follow: decoders
read the next-token prediction at the last token; masked-LM backbones append their mask token there.
A verbalizer word is read as it would follow a space (`" " + word`) and must be exactly one token.
"""

from __future__ import annotations

import json
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from raee_ops.errors import RaeeConfigError
from raee_ops.metrics import BINARY_METRICS, METRICS
from raee_ops.schemas.tables import TEXT, TEXT_PAIR, table_name_problem

if TYPE_CHECKING:  # the manifest's module reads storage, which loads Beam's filesystems: not for every task lookup
    from raee_ops.schemas.manifest import Manifest

#: Longest task name: it names files (`head_<name>.onnx`), which filesystems allow 255 bytes.
MAX_NAME = 100

#: The fields a template may name: the ones Task.render fills in.
FIELDS = ("text", "text_pair")


def template_problem(template: str) -> str | None:
    """What keeps Task.render from filling `template` (None: nothing). str.format would also take positional `{}` or
    `{0}`, conversions and format specs (which may nest fields), and fail on them only when a row is rendered: in a
    build-db worker, long after the export."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"template is not a valid format string ({exc}); write a literal brace as {{{{ or }}}}"
    named = [(name, spec, conversion) for _, name, spec, conversion in parts if name is not None]
    unknown = sorted({"{" + name + "}" for name, _, _ in named if name not in FIELDS})
    if unknown:
        return f"template may name only {{text}} and {{text_pair}}, not {', '.join(unknown)}"
    if any(spec or conversion for _, spec, conversion in named):
        return "template fields take no conversion or format spec: write {text} and {text_pair} as they are"
    if "text" not in {name for name, _, _ in named}:
        return "template must contain {text}"
    return None


@dataclass(frozen=True)
class Task:
    name: str
    template: str
    label_names: list[str]
    verbalizer: list[str]
    #: The task's headline metric (a key of raee_ops.metrics.METRICS), which build-db fits the exit policies to and
    #: evaluate reports; None: macro-F1 with more than two labels, else accuracy.
    metric: str | None = None

    def __post_init__(self) -> None:
        if len(self.name) > MAX_NAME:
            raise RaeeConfigError(f"task name {self.name[:20]!r}…: over {MAX_NAME} characters (it names files)")
        problem = table_name_problem(self.name)
        if problem:  # the name of the task's default table: refused by build-db, after a whole export
            raise RaeeConfigError(f"task name: {problem} (a task's name is its table's by default)")
        problem = template_problem(self.template)
        if problem:
            raise RaeeConfigError(f"task {self.name!r}: {problem}")
        if len(self.label_names) < 2:
            raise RaeeConfigError(f"task {self.name!r}: needs at least two label names")
        if len({unicodedata.normalize("NFC", n) for n in self.label_names}) != len(self.label_names):
            raise RaeeConfigError(f"task {self.name!r}: label names must be distinct (as Unicode compares them)")
        if len(self.verbalizer) != len(self.label_names):
            raise RaeeConfigError(
                f"task {self.name!r}: {len(self.verbalizer)} verbalizer words for {len(self.label_names)} labels"
            )
        if len(set(self.verbalizer)) != len(self.verbalizer):
            raise RaeeConfigError(f"task {self.name!r}: verbalizer words must be distinct")
        if self.metric is not None and self.metric not in METRICS:
            raise RaeeConfigError(f"task {self.name!r}: metric {self.metric!r} is none of {', '.join(METRICS)}")
        if self.metric in BINARY_METRICS and len(self.label_names) != 2:
            raise RaeeConfigError(f"task {self.name!r}: metric {self.metric!r} needs two labels")

    @property
    def metric_name(self) -> str:
        """The metric the task is scored and fitted with: its own, else macro-F1 beyond two labels, else accuracy."""
        return self.metric or ("macro_f1" if len(self.label_names) > 2 else "accuracy")

    @property
    def fields(self) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(self.template) if name}

    @property
    def is_pair(self) -> bool:
        return "text_pair" in self.fields

    def render(self, text: str, text_pair: str | None = None, suffix: str = "", form: str = "prompt") -> str:
        """What the backbone reads for one input in `form` (one of FORMS); `suffix` is the backbone's readout marker
        (e.g. " <mask>")."""
        values = {"text": text.strip()}
        if self.is_pair:
            values["text_pair"] = (text_pair or "").strip()
        if form == "bare":
            return "\n".join(values[name] for name in ("text", "text_pair") if name in values) + suffix
        return self.template.format(**values) + suffix

    def key_inputs(self, table: pa.Table) -> tuple[list[str], list[str] | None]:
        """The texts and pairs of `table`'s rows that a retrieval key embeds: the raw input, stripped, never the
        prompt (the benches read their keys through this too, so they embed what build-db and classify embed)."""
        texts = [t.strip() for t in table.column(TEXT).to_pylist()]
        return texts, [p.strip() for p in table.column(TEXT_PAIR).to_pylist()] if self.is_pair else None


def readout_suffix(readout: str, mask_token: str | None) -> str:
    """What every prompt ends with: the mask token a masked-LM readout reads at, else nothing. One rule for the
    exporter (which verifies and quantizes on such prompts) and the runtime (which builds them from the manifest)."""
    return f" {mask_token}" if readout == "mask" else ""


def _task(name: str, template: str, labels: list[str], words: list[str], metric: str | None = None) -> Task:
    return Task(name=name, template=template, label_names=labels, verbalizer=words, metric=metric)


_ENTAIL = "Premise: {text}\nHypothesis: {text_pair}\nDoes the premise entail the hypothesis (yes or no)?\nAnswer:"

PRESETS: dict[str, Task] = {
    t.name: t
    for t in [
        _task(
            "sst2",
            "Review: {text}\nSentiment (negative or positive):",
            ["negative", "positive"],
            ["negative", "positive"],
        ),
        _task(
            "cola",
            "Sentence: {text}\nIs this sentence grammatically correct English (yes or no)?\nAnswer:",
            ["unacceptable", "acceptable"],
            ["no", "yes"],
            "matthews_corr",  # GLUE's convention
        ),
        _task(
            "mrpc",
            "Sentence 1: {text}\nSentence 2: {text_pair}\n"
            "Do the two sentences mean the same thing (yes or no)?\nAnswer:",
            ["not_equivalent", "equivalent"],
            ["no", "yes"],
            "f1",  # GLUE's convention: F1 of the positive class
        ),
        _task("rte", _ENTAIL, ["entailment", "not_entailment"], ["yes", "no"]),
        _task(
            "qnli",
            "Question: {text}\nSentence: {text_pair}\nDoes the sentence answer the question (yes or no)?\nAnswer:",
            ["entailment", "not_entailment"],
            ["yes", "no"],
        ),
        _task(
            "mnli",
            "Premise: {text}\nHypothesis: {text_pair}\n"
            "Does the premise entail the hypothesis (yes, maybe or no)?\nAnswer:",
            ["entailment", "neutral", "contradiction"],
            ["yes", "maybe", "no"],
        ),
        _task("wnli", _ENTAIL, ["not_entailment", "entailment"], ["no", "yes"]),
        _task(
            "sst5",
            "Review: {text}\nThe movie was (terrible, bad, okay, good or great):",
            ["very negative", "negative", "neutral", "positive", "very positive"],
            ["terrible", "bad", "okay", "good", "great"],
        ),
        _task(
            "trec",
            "Question: {text}\nThe answer is a (abbreviation, description, entity, human, location or number):",
            ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"],
            ["abbreviation", "description", "entity", "human", "location", "number"],
        ),
    ]
}


#: How an export from before tasks carried their metric is scored and fitted: by the task's name, as it was then.
LEGACY_METRICS = {"cola": "matthews_corr", "mrpc": "f1", "qqp": "f1"}

#: A task file's keys, each a non-empty string or a list of them, and its optional ones (strings).
TASK_FILE_STRINGS = ("name", "template")
TASK_FILE_LISTS = ("label_names", "verbalizer")
TASK_FILE_OPTIONAL = ("metric",)


def load_task_file(path: str | Path) -> Task:
    """A user's task from JSON with `name`, `template`, `label_names`, `verbalizer` and optionally `metric`: every
    problem with the file is one line naming the file (and the field), before any model loads."""
    path = Path(path)
    raw = _read_task_file(path)
    missing = [k for k in TASK_FILE_STRINGS + TASK_FILE_LISTS if k not in raw]
    if missing:
        raise RaeeConfigError(f"task file {path} lacks {', '.join(missing)}")
    known = TASK_FILE_STRINGS + TASK_FILE_LISTS + TASK_FILE_OPTIONAL
    unknown = [k for k in raw if k not in known]
    if unknown:  # a misspelt or wished-for field would be ignored without a word
        raise RaeeConfigError(f"task file {path}: unknown field {unknown[0]!r}; a task file has {', '.join(known)}")
    try:  # an optional field given as null is left out
        given = [key for key in TASK_FILE_OPTIONAL if raw.get(key) is not None]
        strings = {key: _text(raw[key], key) for key in [*TASK_FILE_STRINGS, *given]}
        lists = {key: _texts(raw[key], key) for key in TASK_FILE_LISTS}
        task = Task(**strings, **lists)
    except RaeeConfigError as err:
        raise RaeeConfigError(f"task file {path}: {err}") from None
    problem = _file_task_problem(task)
    if problem:
        raise RaeeConfigError(f"task file {path}: {problem}")
    return task


def _file_task_problem(task: Task) -> str | None:
    """What a user's task may not do that a stored one (an export's, read back) is not asked again: take a built-in
    task's name (`--task sst2` would then mean the file's task in that export, another in the next), or end its
    template in a space (a tab, a no-break space: any but a line break; the label word is read after a space of its
    own, so the prompt would hold two)."""
    if task.name in PRESETS:
        return f"name {task.name!r} is a built-in task's; give your task its own name (or use --task {task.name})"
    if task.template[-1].isspace() and task.template[-1] != "\n":
        return (
            f"template ends in a space ({task.template[-1]!r}); end it where the label word follows (the word is read "
            "after a space of its own)"
        )
    return None


class _Twice(ValueError):
    """A field given twice in one JSON object (json keeps the last without a word)."""


def _once(pairs: list[tuple[str, object]]) -> dict:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _Twice(key)
        seen.add(key)
    return dict(pairs)


def _read_task_file(path: Path) -> dict:
    """The file's JSON object; a byte-order mark (Windows editors write one) is no content."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_once)
    except FileNotFoundError as exc:
        raise RaeeConfigError(f"task file not found: {path}") from exc
    except _Twice as exc:
        raise RaeeConfigError(f"task file {path}: field {exc.args[0]!r} given twice; give it once") from exc
    except ValueError as exc:
        raise RaeeConfigError(f"task file {path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise RaeeConfigError(f"cannot read task file {path}: {exc.strerror or exc}") from exc
    if not isinstance(raw, dict):
        raise RaeeConfigError(f"task file {path} holds a JSON {_json_type(raw)}; it must be an object")
    return raw


def _text(value: object, key: str) -> str:
    """A non-empty string: `list(...)` of one would split it into characters, a number fail deep in the export."""
    if not isinstance(value, str) or not value.strip():
        shown = "a blank string" if isinstance(value, str) else f"a JSON {_json_type(value)}"
        raise RaeeConfigError(f"{key} must be a non-empty string, not {shown}")
    return value


def _texts(value: object, key: str) -> list[str]:
    if not isinstance(value, list):
        raise RaeeConfigError(f"{key} must be a list of strings, not a JSON {_json_type(value)}")
    return [_text(item, f"{key}[{index}]") for index, item in enumerate(value)]


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def get_task(name: str) -> Task:
    if name not in PRESETS:
        raise RaeeConfigError(f"unknown task {name!r}; presets: {', '.join(PRESETS)} (or pass --task-file)")
    return PRESETS[name]


def task_of(manifest: Manifest, name: str) -> Task:
    """The task as exported: the artifacts, not the preset list, are the source of truth. An export from before
    tasks carried their metric is scored as it was then, by the task's name (tasks.LEGACY_METRICS)."""
    entry = manifest.task(name)
    metric = entry.metric or LEGACY_METRICS.get(name)
    if metric in BINARY_METRICS and len(entry.label_names) != 2:  # a `qqp` of three labels: by its label count
        metric = None
    return Task(
        name=name,
        template=entry.template,
        label_names=list(entry.label_names),
        verbalizer=list(entry.verbalizer),
        metric=metric,
    )
