"""Task files and verbalizer words: every mistake in a task is refused when the task is read (one line naming the
file and the field, exit 2), never an internal error or an export that build-db fails on later."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import TIMEOUT_S, one_error_line, raee_ops
from raee_ops.onnx_export.verbalizer import label_token_ids
from tiny_encoders import _bert_tokenizer
from tiny_models import build_tokenizer

from raee_ops.errors import RaeeConfigError
from raee_ops.tasks import PRESETS, Task, load_task_file

GOOD = {
    "name": "t",
    "template": "Review: {text}\nSentiment:",
    "label_names": ["a", "b"],
    "verbalizer": ["negative", "positive"],
}


def write(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "task.json"
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (["name", "template"], "holds a JSON list; it must be an object"),
        (5, "holds a JSON number; it must be an object"),
        ({**GOOD, "name": None}, "name must be a non-empty string, not a JSON null"),
        ({**GOOD, "name": ""}, "name must be a non-empty string, not a blank string"),
        ({**GOOD, "template": ["Review: {text}"]}, "template must be a non-empty string, not a JSON list"),
        ({**GOOD, "label_names": "np"}, "label_names must be a list of strings, not a JSON string"),
        ({**GOOD, "verbalizer": "np"}, "verbalizer must be a list of strings, not a JSON string"),
        ({**GOOD, "verbalizer": ["negative", 5]}, r"verbalizer\[1\] must be a non-empty string, not a JSON number"),
        ({**GOOD, "label_names": ["a", "a"]}, "label names must be distinct"),
        ({**GOOD, "label_names": ["\u00e9", "e\u0301"]}, "label names must be distinct .as Unicode compares them"),
        ({**GOOD, "template": "Review: {text} {}\nSentiment:"}, r"only \{text\} and \{text_pair\}, not \{\}"),
        ({**GOOD, "template": "Review: {text}\nSentiment: {0}"}, r"not \{0\}"),
        ({**GOOD, "template": "Review: {text.upper}"}, r"not \{text.upper\}"),
        ({**GOOD, "template": "Review: {text\nSentiment:"}, "not a valid format string"),
        ({**GOOD, "template": "Review: {text} }"}, "not a valid format string"),
        ({**GOOD, "template": "Review: {text:{}}"}, "no conversion or format spec"),
        ({**GOOD, "template": "Review: {text!r}"}, "no conversion or format spec"),
        ({**GOOD, "template": "Review: {{text}}"}, r"must contain \{text\}"),
        ({k: v for k, v in GOOD.items() if k != "verbalizer"}, "lacks verbalizer"),
        ({**GOOD, "labels": ["a", "b"]}, "unknown field 'labels'"),  # ignored without a word
        ({**GOOD, "name": "x" * 300}, "over 100 characters"),  # failed in the export, writing head_<name>.onnx
        ({**GOOD, "name": "my task"}, r"task name: table name 'my task' may hold only letters"),  # exported, then
        ({**GOOD, "name": "t__features"}, "build-db's companion"),  # refused as build-db's default table name
        ({**GOOD, "name": "sst2"}, "name 'sst2' is a built-in task's; give your task its own name"),
        ({**GOOD, "template": "Review: {text}\nSentiment: "}, "template ends in a space"),  # the prompt held two
        ({**GOOD, "template": "Review: {text}\nSentiment:\t"}, r"template ends in a space \('\\t'\)"),
        ({**GOOD, "template": "Review: {text}\nSentiment:\u00a0"}, r"template ends in a space \('\\xa0'\)"),
        ({**GOOD, "metric": "auc"}, "metric 'auc' is none of accuracy, matthews_corr, f1, macro_f1"),
        ({**GOOD, "metric": 1}, "metric must be a non-empty string, not a JSON number"),
        ({**GOOD, "label_names": ["a", "b", "c"], "verbalizer": ["x", "y", "z"], "metric": "f1"}, "needs two labels"),
    ],
)
def test_bad_task_files_are_refused_naming_file_and_field(tmp_path: Path, content: object, message: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(RaeeConfigError, match=f"task file {path}.*{message}"):
        load_task_file(path)


def test_a_task_is_scored_with_its_own_metric_else_by_its_label_count(tmp_path: Path) -> None:
    """A task file may name its metric (an imbalanced task fitted for accuracy exits for the majority label); a
    task's name is no metric: a task file called `cola` was scored with Matthews correlation, unasked."""
    assert load_task_file(write(tmp_path, {**GOOD, "metric": "matthews_corr"})).metric_name == "matthews_corr"
    assert Task(**{**GOOD, "name": "cola"}).metric_name == "accuracy"  # as an export's task read back
    three = {**GOOD, "label_names": ["a", "b", "c"], "verbalizer": ["x", "y", "z"]}
    assert load_task_file(write(tmp_path, three)).metric_name == "macro_f1"
    assert [PRESETS[name].metric_name for name in ("cola", "mrpc", "sst2", "trec")] == [
        "matthews_corr",
        "f1",
        "accuracy",
        "macro_f1",
    ]


def test_a_task_file_field_given_twice_is_refused_and_a_byte_order_mark_or_null_metric_is_none(tmp_path: Path) -> None:
    """json keeps the last of two same fields without a word (an edit that added a second `template` ran the one
    below it); a null optional field was refused though optional, and a file with a byte-order mark as not JSON."""
    path = tmp_path / "twice.json"
    path.write_text(
        '{"name": "t", "template": "A: {text}", "template": "B: {text}", "label_names": ["n", "p"], '
        '"verbalizer": ["no", "yes"]}'
    )
    with pytest.raises(RaeeConfigError, match=f"task file {path}: field 'template' given twice; give it once"):
        load_task_file(path)
    assert load_task_file(write(tmp_path, {**GOOD, "metric": None})).metric_name == "accuracy"
    marked = tmp_path / "bom.json"
    marked.write_text(json.dumps(GOOD), encoding="utf-8-sig")
    assert load_task_file(marked) == load_task_file(write(tmp_path, GOOD))


def test_a_good_task_file_renders_with_literal_braces(tmp_path: Path) -> None:
    task = load_task_file(write(tmp_path, {**GOOD, "template": "{{json}}: {text}\n{text_pair}?"}))
    assert task.is_pair and task.render(" hi ", "there") == "{json}: hi\nthere?"
    assert load_task_file(write(tmp_path, {**GOOD, "template": "Review: {text}\nSentiment:\n"}))  # a line break: yes


def test_cli_refuses_a_positional_template_before_loading_the_model(tmp_path: Path) -> None:
    """The model does not exist: the task file is the error, exit 2, nothing written."""
    path = write(tmp_path, {**GOOD, "template": "Review: {text} {}\nSentiment:"})
    run = raee_ops("export-onnx", "--model", tmp_path / "none.gguf", "--task-file", path, "--out", tmp_path / "out")
    assert run.returncode == 2 and "template may name only" in one_error_line(run)
    assert not (tmp_path / "out").exists()


def test_cli_reads_task_files_before_importing_the_pipeline(tmp_path: Path) -> None:
    """A wrong task file is answered in the CLI's own start-up time, not after torch and Beam import (seconds)."""
    path = write(tmp_path, {**GOOD, "name": None})
    args = ["export-onnx", "--model", "m.gguf", "--task-file", str(path), "--out", str(tmp_path / "out")]
    code = f"import sys\nfrom raee_ops.cli import main\ntry:\n    main({args!r})\nexcept SystemExit as e:\n    "
    code += "print(e.code, 'torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.stdout.split() == ["2", "False"] and "name must be a non-empty string" in one_error_line(run)


@pytest.mark.parametrize(
    ("tokenizer", "words", "message"),
    [
        (build_tokenizer(add_bos=False), ["zzzq", "qqqz"], "'zzzq' is the unknown token '<unk>'"),
        (_bert_tokenizer(), ["Yes", "yes"], "'Yes' and 'yes' are the same token 'yes'"),
    ],
)
def test_verbalizer_words_must_be_known_tokens_of_their_own(tokenizer: object, words: list[str], message: str) -> None:
    with pytest.raises(RaeeConfigError, match=message):
        label_token_ids(tokenizer, Task("t", GOOD["template"], ["a", "b"], words))


def test_preset_verbalizers_are_distinct_known_tokens() -> None:
    tokenizer = build_tokenizer(add_bos=False)
    for task in PRESETS.values():
        assert len(set(label_token_ids(tokenizer, task))) == len(task.verbalizer)
