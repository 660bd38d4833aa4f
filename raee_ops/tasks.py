"""Tasks: a prompt template, label names and a verbalizer (one word per label).

A template uses `{text}` (and `{text_pair}` for pair tasks) and ends where the label word would follow: decoders
read the next-token prediction at the last token; masked-LM backbones append their mask token there.
A verbalizer word is read as it would follow a space (`" " + word`) and must be exactly one token.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from raee_ops.errors import RaeeConfigError

#: The forms a backbone can read an input in: the task's prompt (template, instruction and all), or the bare input (the
#: text, and the pair on the next line). The label-word head needs the prompt; probe heads read either, and on pair
#: tasks the bare input's states probe far better (build-db picks per table by cross-validation, raee_ops.probes).
FORMS = ("prompt", "bare")


@dataclass(frozen=True)
class Task:
    name: str
    template: str
    label_names: list[str]
    verbalizer: list[str]

    def __post_init__(self) -> None:
        fields = self.fields
        if "text" not in fields:
            raise RaeeConfigError(f"task {self.name!r}: template must contain {{text}}")
        unknown = fields - {"text", "text_pair"}
        if unknown:
            raise RaeeConfigError(f"task {self.name!r}: unknown template fields {sorted(unknown)}")
        if len(self.label_names) < 2:
            raise RaeeConfigError(f"task {self.name!r}: needs at least two label names")
        if len(self.verbalizer) != len(self.label_names):
            raise RaeeConfigError(
                f"task {self.name!r}: {len(self.verbalizer)} verbalizer words for {len(self.label_names)} labels"
            )
        if len(set(self.verbalizer)) != len(self.verbalizer):
            raise RaeeConfigError(f"task {self.name!r}: verbalizer words must be distinct")

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

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "template": self.template,
            "label_names": list(self.label_names),
            "verbalizer": list(self.verbalizer),
        }


def _task(name: str, template: str, labels: list[str], words: list[str]) -> Task:
    return Task(name=name, template=template, label_names=labels, verbalizer=words)


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
        ),
        _task(
            "mrpc",
            "Sentence 1: {text}\nSentence 2: {text_pair}\n"
            "Do the two sentences mean the same thing (yes or no)?\nAnswer:",
            ["not_equivalent", "equivalent"],
            ["no", "yes"],
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


def load_task_file(path: str | Path) -> Task:
    """A user's task from JSON with `name`, `template`, `label_names`, `verbalizer`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise RaeeConfigError(f"task file not found: {path}") from exc
    except ValueError as exc:
        raise RaeeConfigError(f"task file {path} is not valid JSON: {exc}") from exc
    missing = [k for k in ("name", "template", "label_names", "verbalizer") if k not in raw]
    if missing:
        raise RaeeConfigError(f"task file {path} lacks {', '.join(missing)}")
    return Task(
        name=raw["name"],
        template=raw["template"],
        label_names=list(raw["label_names"]),
        verbalizer=list(raw["verbalizer"]),
    )


def get_task(name: str) -> Task:
    if name not in PRESETS:
        raise RaeeConfigError(f"unknown task {name!r}; presets: {', '.join(PRESETS)} (or pass --task-file)")
    return PRESETS[name]
