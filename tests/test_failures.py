"""Every way a scheduled run used to lose rows, a table or the truth about its outcome (issue 11's table), through
the CLI in its own process: exit code, the single `error:` line, row counts, what is left on disk."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import lancedb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from cli_runs import bound_by_permissions, one_error_line, raee_ops, read_folder
from raee_ops.pipelines import build_db, options
from raee_ops.pipelines.build_db import run_build_db
from raee_ops.pipelines.classify import run_classify
from raee_ops.schemas import manifest as manifest_module
from raee_ops.schemas.manifest import load_manifest, sealed
from raee_ops.schemas.tables import FEATURES_SUFFIX, FEATURES_VERSION_META_KEY, TABLE_META_KEY, TableMeta
from segment_artifacts import make_artifacts, reexported, segment_artifacts  # noqa: F401 - fixture
from test_pipelines import labelled, sentences

from raee_ops import exit_table, retrieval, storage
from raee_ops.batches import Classify, LayerRows
from raee_ops.cli import PRICE, main
from raee_ops.commit import locked, new_run_id, scratch_folder
from raee_ops.errors import ArtifactsChanged, RaeeConfigError, RaeeRunError
from raee_ops.evaluate import evaluate
from raee_ops.inputs import read_validated_file
from raee_ops.key_names import DEFAULT_KEY
from raee_ops.report import REPORT_FILES
from raee_ops.retrieval import conflict, table_names
from raee_ops.rows import ROW_ID, SOURCE
from raee_ops.run_record import JOBS_KEPT, RunRecord
from raee_ops.runtime import SegmentRuntime
from raee_ops.tasks import PRESETS


@pytest.fixture(scope="module")
def db(segment_artifacts, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("failures")
    train = labelled(root / "train.parquet", 30, 0, "t", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(train)], str(root / "db"), "sst2", "backbone", "overwrite", None)
    return root / "db"


def classify_args(artifacts, db, output, *inputs, extra=()):
    args = ["classify", "--artifacts", artifacts, "--task", "sst2", "--db", db, "--output", output, *extra]
    for path in inputs:
        args += ["--input", path]
    return args


def build_args(artifacts, db, *inputs, table="sst2", extra=()):
    args = ["build-db", "--artifacts", artifacts, "--task", "sst2", "--db", db, "--table", table, *extra]
    for path in inputs:
        args += ["--input", path]
    return args


def table_state(db, name="sst2") -> tuple[int, int]:
    table = lancedb.connect(str(db)).open_table(name)
    return table.count_rows(), table.version


def test_1_two_classify_runs_on_one_output_never_both_write(segment_artifacts, db, tmp_path):  # noqa: F811
    queries = labelled(tmp_path / "q.parquet", 40, 1, "q", bad=False)
    out = tmp_path / "out"
    with locked(out, "--output"):  # a live run holds the folder: the next one is refused, the folder untouched
        busy = raee_ops(*classify_args(segment_artifacts, db, out, queries))
    assert busy.returncode == 75 and "another run is writing --output" in one_error_line(busy)
    assert list(out.iterdir()) == []
    args = [sys.executable, "-m", "raee_ops", *map(str, classify_args(segment_artifacts, db, out, queries))]
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(r.communicate(timeout=300)[0], r.returncode) for r in runs]
    codes = sorted(code for _, code in results)
    assert codes in ([0, 0], [0, 75]), codes  # refused while the other runs (75), or found its job done (0)
    assert sum("already done" in stdout for stdout, _ in results) == codes.count(0) - 1  # only one ran
    assert read_folder(out, "predictions").num_rows == 40 and (out / "_SUCCESS").exists()
    respelt = Path(os.path.relpath(db, tmp_path))  # the same database, spelt from the job's working directory
    retry = raee_ops(*classify_args(segment_artifacts, respelt, out, queries), cwd=tmp_path)  # a scheduler's retry
    assert retry.returncode == 0 and "already done" in retry.stdout and "predicted: 40" in retry.stdout
    assert "beam exit counters" not in retry.stdout  # no pipeline ran: nothing to say of its counters
    (tmp_path / "db-link").symlink_to(db)  # the same database through a link: the same job
    retry = raee_ops(*classify_args(segment_artifacts, tmp_path / "db-link", out, queries))
    assert retry.returncode == 0 and "already done" in retry.stdout, retry.stderr
    other = labelled(tmp_path / "q.parquet", 41, 1, "q", bad=False)  # the same path, other rows: another job
    run = raee_ops(*classify_args(segment_artifacts, db, out, other))
    changed = f"{os.path.realpath(other)}: changed since"  # named by its path: a partition's files share names
    assert run.returncode == 2 and f"complete output (_SUCCESS present) of another job ({changed})" in (
        one_error_line(run)
    )
    run = raee_ops(*classify_args(segment_artifacts, db, out, queries, extra=["--k", "3"]))
    assert run.returncode == 2 and f"of another job (its --k was 10, this run's 3; {changed})" in one_error_line(run)


def test_1b_a_twin_that_finishes_first_makes_the_other_done_not_refused(segment_artifacts, db, tmp_path, monkeypatch):  # noqa: F811
    """Two runs of one job started together: the second looked for a finished output before the first published
    and took the claim after it, then was refused (exit 2, "already holds a complete output"), which a scheduler
    does not retry. Under the claim it now finds its own job done. Another tool's `_SUCCESS` (Spark's and Hadoop's
    are empty) is another output, refused in one line; it was an internal error (exit 1)."""
    from raee_ops.pipelines import classify

    queries = labelled(tmp_path / "q.parquet", 12, 1, "q", bad=False)
    out = str(tmp_path / "out")
    first = classify.run_classify(segment_artifacts, "sst2", str(db), "sst2", [str(queries)], out, 4, "raee")
    monkeypatch.setattr(classify, "completed", lambda folder, job: None)  # its look came before the first's _SUCCESS
    twin = classify.run_classify(segment_artifacts, "sst2", str(db), "sst2", [str(queries)], out, 4, "raee")
    assert twin.done and (twin.rows_in, twin.predicted) == (first.rows_in, first.predicted) == (12, 12)
    monkeypatch.undo()
    spark = tmp_path / "spark"
    spark.mkdir()
    (spark / "_SUCCESS").write_bytes(b"")
    run = raee_ops(*classify_args(segment_artifacts, db, spark, queries))
    assert run.returncode == 2 and "already holds a complete output (_SUCCESS present)" in one_error_line(run)


def test_2_misspelt_options_are_usage_errors_naming_the_closest(segment_artifacts, db, tmp_path):  # noqa: F811
    before = table_state(db)
    train = labelled(tmp_path / "few.parquet", 4, 2, "few", bad=False)
    run = raee_ops(*build_args(segment_artifacts, db, train, extra=["--moed", "append"]))
    assert run.returncode == 2 and "no such option: --moed (did you mean --mode?)" in one_error_line(run)
    assert table_state(db) == before
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", train, extra=["--stratgy", "raee"]))
    assert run.returncode == 2 and "(did you mean --strategy?)" in one_error_line(run)
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", train, extra=["--moed", "append"]))
    line = one_error_line(run)  # classify has no --mode: it named Dataflow's --zone as if classify's
    assert run.returncode == 2 and "(did you mean --mode, an option of build-db, not of this command?)" in line
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", train, extra=["--runer", "x"]))
    assert run.returncode == 2 and "(did you mean Beam's --runner?)" in one_error_line(run)
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", train, extra=["--foo", "1"]))
    line = one_error_line(run)  # like nothing: no hint (the dashes alone made it 60% like export-onnx's --out)
    assert run.returncode == 2 and "no such option: --foo;" in line and "did you mean" not in line
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", train, extra=["--raee_mode", "x"]))
    assert run.returncode == 2 and "--raee_db" not in one_error_line(run)  # an option never to give, not suggested
    misspelt_required = [
        "--artifact" if a == "--artifacts" else a for a in classify_args(segment_artifacts, db, tmp_path / "o", train)
    ]
    run = raee_ops(*misspelt_required)  # named as the typo it is, not as a missing --artifacts
    assert run.returncode == 2 and "no such option: --artifact (did you mean --artifacts?)" in one_error_line(run)
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", train, extra=["--embedder", "backbone"]))
    line = one_error_line(run)  # another command's option, named as such (evaluate's --max-rejected: "--project?")
    assert run.returncode == 2 and "no such option: --embedder (an option of build-db and export-onnx, not" in line
    run = raee_ops("export-onnx", "--model", "m", "--out")  # click's parser: this command's help, not the top's
    assert run.returncode == 2 and "requires an argument. (see raee-ops export-onnx --help)" in one_error_line(run)
    run = raee_ops(*build_args(segment_artifacts, db, train, extra=["--embedder", "minilm-x"]))
    assert (
        run.returncode == 2
        and "choose backbone, minilm, minilm-N (either also as ...-int8) or layer-N" in one_error_line(run)
    )
    run = raee_ops("export-onnx", "--model", "m", "--task", "sst2", "--out", tmp_path / "x", "--embedder", "minlm")
    assert run.returncode == 2 and "unknown embedder 'minlm'; known: minilm, minilm-N" in one_error_line(run)
    export = ["export-onnx", "--model", "m", "--task", "sst2", "--out", tmp_path / "x"]
    run = raee_ops(*export, "--embedder", "minilm-3", "--embedder", "minilm-3")
    assert run.returncode == 2 and "names an embedder twice: minilm-3, minilm-3" in one_error_line(run)
    run = raee_ops(*export, "--embedder", "none", "--embedder", "minilm")
    assert run.returncode == 2 and "`none` exports no embedder; give it alone" in one_error_line(run)
    assert not (tmp_path / "x").exists()
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", train, extra=["--k", "0"]))
    assert run.returncode == 2 and "--k" in one_error_line(run)
    recorded = ["--raee_strategy", "full"]  # a pipeline option raee-ops sets from --strategy: it was dropped
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", train, extra=recorded))
    assert run.returncode == 2 and "(it would be ignored); give --strategy (see" in one_error_line(run)
    assert not (tmp_path / "o").exists()
    beam_option = ["--direct_num_workers", "1"]  # Beam's own options still pass through
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", train, extra=beam_option))
    assert run.returncode == 0, run.stderr
    version = raee_ops("--version")
    assert version.returncode == 0 and version.stdout.startswith("raee-ops, version ")


def test_3_every_input_is_read(segment_artifacts, db, tmp_path):  # noqa: F811
    a = labelled(tmp_path / "a.parquet", 7, 3, "a", bad=False)
    b = labelled(tmp_path / "b.parquet", 5, 4, "b", bad=False)
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "out", a, b))
    assert run.returncode == 0, run.stderr
    assert "rows in: 12  predicted: 12  rejected: 0" in run.stdout
    assert sorted(read_folder(tmp_path / "out", "predictions").column("id").to_pylist()) == sorted(
        [f"a{i}" for i in range(7)] + [f"b{i}" for i in range(5)]
    )
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "out2", a, tmp_path / "typo.parquet"))
    assert run.returncode == 2 and "typo.parquet: no such file" in one_error_line(run)


def test_4_build_db_never_replaces_a_table_with_nothing(segment_artifacts, db, tmp_path):  # noqa: F811
    before = table_state(db)
    empty = tmp_path / "empty.parquet"
    empty_table = pa.table(
        {"id": pa.array([], pa.string()), "text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}
    )
    pq.write_table(empty_table, empty)
    run = raee_ops(*build_args(segment_artifacts, db, empty))
    assert run.returncode == 2 and "would replace table 'sst2' with an empty one" in one_error_line(run)
    rejected = tmp_path / "rejected.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["good", "bad"], "label": [7, 9]}), rejected)
    errors = db / "_errors" / "sst2"
    published = ds.dataset(str(errors)).count_rows()
    run = raee_ops(*build_args(segment_artifacts, db, rejected))
    assert run.returncode == 4 and "2 of 2 rows rejected" in one_error_line(run)
    kept = Path(one_error_line(run).split("its rejected rows: ")[1])  # shown, but not in the errors output
    assert kept.parent.parent == errors / "_uncommitted" and kept.parent.name.startswith("sst2.")
    assert sorted(ds.dataset(str(kept)).to_table().column("id").to_pylist()) == ["x", "y"]
    assert sorted(p.name for p in errors.glob("_*")) == ["_uncommitted"]  # no emptied staging folder left behind
    run = raee_ops(*build_args(segment_artifacts, db, rejected, extra=["--max-rejected", "1"]))
    assert run.returncode == 2 and "with an empty one" in one_error_line(run) and "its rejected rows" in run.stderr
    assert not kept.exists() and len(list(kept.parent.iterdir())) == 1  # the next run removed the earlier one's
    assert ds.dataset(str(errors)).count_rows() == published  # neither run committed: no errors published
    assert table_state(db) == before
    copy = tmp_path / "db-copy"
    shutil.copytree(db, copy)
    run = raee_ops(*build_args(segment_artifacts, copy, empty, extra=["--allow-empty"]))
    assert run.returncode == 0, run.stderr
    assert table_state(copy)[0] == 0
    for strategy in ("knn-vote", "probe-fused"):  # no neighbours to answer with: refused, not made-up answers
        run = raee_ops(
            *classify_args(segment_artifacts, copy, tmp_path / "out", rejected, extra=["--strategy", strategy])
        )
        assert run.returncode == 2 and "is empty: add reference rows" in one_error_line(run)
    assert not (tmp_path / "out").exists()
    run = raee_ops(*classify_args(segment_artifacts, copy, tmp_path / "full", rejected, extra=["--strategy", "full"]))
    assert run.returncode == 0, run.stderr  # `full` reads nothing of the table: it runs as before
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "none", empty))  # an input of no rows: balanced
    assert (
        run.returncode == 0 and "rows in: 0  predicted: 0  rejected: 0  (in = predicted + rejected: ok)" in run.stdout
    )
    assert "mean exit layer: - (no row predicted) of" in run.stdout and (tmp_path / "none" / "_SUCCESS").is_file()
    # a table built empty takes its first rows by append (refused: 'built before probe heads', which was false)
    first = labelled(tmp_path / "first.parquet", 12, 0, "f", bad=False)
    run = raee_ops(*build_args(segment_artifacts, copy, first, extra=["--mode", "append"]))
    assert run.returncode == 0 and table_state(copy)[0] == 12, run.stderr


def test_a_table_killed_before_its_first_commit_is_redone_and_stops_no_listing(segment_artifacts, db, tmp_path):  # noqa: F811
    """A build-db killed while LanceDB wrote a new table's first data files, before its first manifest, left a
    folder LanceDB lists but cannot open: every retry of that build-db exited 2, and info and prune of the whole
    database exited 2 on it, listing and pruning no other table. It holds no row: info and prune pass it by (a
    build-db may be creating it now) and the table's next build-db removes it, says so, and builds the table."""
    copy = tmp_path / "db"
    shutil.copytree(db, copy)
    shutil.copytree(db / "sst2.lance" / "data", copy / "newt.lance" / "data")  # data written, no version committed
    (copy / "newt__features.lance").mkdir()
    info = raee_ops("info", "--db", copy)
    assert info.returncode == 0 and "sst2" in info.stdout and "newt" not in info.stdout, info.stderr
    prune = raee_ops("prune", "--db", copy, "--keep", "1")
    assert prune.returncode == 0, prune.stderr
    # a live table's companion alone unfinished (its first write killed): prune passes it by, as the table's
    # next build-db removes it (prune of the whole database exited 2 on it)
    live = tmp_path / "live"
    shutil.copytree(db, live)
    shutil.rmtree(live / "sst2__features.lance" / "_versions")
    for command in (["prune", "--db", live, "--keep", "1"], ["prune", "--db", live, "--table", "sst2", "--keep", "1"]):
        prune = raee_ops(*command)
        assert prune.returncode == 0 and "sst2" in prune.stdout, prune.stderr
    queries = labelled(tmp_path / "q.parquet", 4, 1, "q")
    for command in (
        ["info", "--db", copy, "--table", "newt"],
        classify_args(segment_artifacts, copy, tmp_path / "o", queries, extra=["--table", "newt"]),
    ):
        run = raee_ops(*command)
        assert run.returncode == 2 and "table 'newt'" in one_error_line(run) and "no committed version" in run.stderr
    train = labelled(tmp_path / "train.parquet", 12, 0, "t", bad=False)
    run = raee_ops(*build_args(segment_artifacts, copy, train, table="newt"))
    assert run.returncode == 0, run.stderr
    assert f"removed what an earlier, unfinished run left: {copy / 'newt.lance'}" in run.stderr + run.stdout
    assert table_state(copy, "newt")[0] == 12


def test_6_undecodable_rows_and_corrupt_pages_stay_row_problems(segment_artifacts, db, tmp_path):  # noqa: F811
    raw = pa.array([b"good fun", b"\xff\xfe awful", b"dull plot"], pa.binary())
    text = pa.Array.from_buffers(pa.string(), 3, raw.buffers()[:3])  # a string column that is not UTF-8
    pq.write_table(pa.table({"id": ["u0", "u1", "u2"], "text": text}), tmp_path / "utf8.parquet")
    corrupt = tmp_path / "corrupt.parquet"
    table = pa.table({"id": [f"c{i}" for i in range(40)], "text": sentences(40, 5)})
    pq.write_table(table, corrupt, row_group_size=20, compression="snappy")
    column = pq.ParquetFile(corrupt).metadata.row_group(0).column(1)
    data = bytearray(corrupt.read_bytes())
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    end = start + column.total_compressed_size
    data[end - 16 : end] = bytes(16)  # garbage at the end of the first row group's text page
    corrupt.write_bytes(bytes(data))
    out = tmp_path / "out"
    run = raee_ops(*classify_args(segment_artifacts, db, out, tmp_path / "utf8.parquet", corrupt))
    assert run.returncode == 0, run.stderr
    assert "rows in: 43  predicted: 22  rejected: 21" in run.stdout
    errors = read_folder(out, "_errors")
    reasons = dict(zip(errors.column("id").to_pylist(), errors.column("reason").to_pylist(), strict=True))
    assert reasons.pop("u1") == "text is not valid UTF-8"
    assert all("unreadable Parquet data (row group 0)" in r for r in reasons.values())
    assert sorted(reasons) == sorted(f"c{i}" for i in range(20))  # by their ids: the damage spared the id column
    assert set(errors.column("file").to_pylist()) == {str(tmp_path / "utf8.parquet"), str(corrupt)}
    predicted = read_folder(out, "predictions").column("id").to_pylist()
    assert sorted(predicted) == sorted(["u0", "u2"] + [f"c{i}" for i in range(20, 40)])


def test_6b_a_row_group_that_decodes_short_or_an_unreadable_id_page_loses_no_row(segment_artifacts, tmp_path):  # noqa: F811
    """A corrupt page header can make a row group decode to fewer rows than its footer counts, with no error (the
    run then failed unbalanced, losing every row); a corrupt id page failed build-db's duplicate check outright."""
    short = tmp_path / "short.parquet"
    labels = [i % 2 for i in range(40)]
    table = pa.table({"id": [f"s{i}" for i in range(40)], "text": sentences(40, 8), "label": labels})
    pq.write_table(table, short, row_group_size=10, compression="snappy", use_dictionary=False)
    offset = pq.ParquetFile(short).metadata.row_group(2).column(1).data_page_offset
    data = bytearray(short.read_bytes())
    assert data[offset + 1] == 0
    data[offset + 1] = 0x43
    short.write_bytes(bytes(data))
    read = list(read_validated_file(str(short), PRESETS["sst2"], True, storage.content_digest(str(short))))
    valid, errors = (sum(getattr(v, part).num_rows for v in read) for part in ("valid", "errors"))
    assert valid < 40 and valid + errors == 40
    reasons = pa.concat_tables([v.errors for v in read]).column("reason").to_pylist()
    assert all(r.startswith("unreadable Parquet data (row group 2): its pages held") for r in reasons)

    bad_id = tmp_path / "bad_id.parquet"
    pq.write_table(table, bad_id, row_group_size=10, compression="snappy", use_dictionary=False)
    column = pq.ParquetFile(bad_id).metadata.row_group(1).column(0)
    data = bytearray(bad_id.read_bytes())
    end = column.data_page_offset + column.total_compressed_size
    data[end - 20 : end] = b"\xff" * 20  # the tail of row group 1's compressed id page
    bad_id.write_bytes(bytes(data))
    run = raee_ops(*build_args(segment_artifacts, tmp_path / "db", bad_id))
    assert run.returncode == 0, run.stderr
    assert "rows in: 40  written: 30  rejected: 10" in run.stdout, run.stdout
    errors = ds.dataset(str(tmp_path / "db" / "_errors" / "sst2")).to_table().column("id").to_pylist()
    assert all(e.startswith("row:") for e in errors)  # an unreadable id page: the rows named by position


def test_6c_a_page_that_fails_its_crc_checksum_is_an_unreadable_row_group(tmp_path):
    """Page checksums were never verified: a text page changed on disk decoded to other text, classified (exit 0)."""
    path = tmp_path / "crc.parquet"
    table = pa.table({"id": [f"k{i}" for i in range(20)], "text": [f"a good plot {i}" for i in range(20)]})
    plain = {"compression": "none", "use_dictionary": False, "write_statistics": False}  # the text once, in the page
    pq.write_table(table, path, write_page_checksum=True, row_group_size=10, **plain)
    offset = pq.ParquetFile(path).metadata.row_group(1).column(1).data_page_offset
    data = path.read_bytes()
    at = data.index(b"good", offset)
    path.write_bytes(data[:at] + b"dull" + data[at + 4 :])  # the page still decodes, to another text
    read = list(read_validated_file(str(path), PRESETS["sst2"], False, storage.content_digest(str(path))))
    assert [i for v in read for i in v.valid[ROW_ID].to_pylist()] == [f"k{i}" for i in range(10)]
    reasons = pa.concat_tables([v.errors for v in read]).column("reason").to_pylist()
    assert len(reasons) == 10 and all(
        r.startswith("unreadable Parquet data (row group 1): OSError: ") and "CRC checksum" in r for r in reasons
    )


def test_6c_a_garbled_page_header_is_an_unreadable_row_group_with_a_one_line_reason(tmp_path):
    """Arrow's message for it runs over three lines; each rejected row's reason is one line."""
    path = tmp_path / "header.parquet"
    table = pa.table({"id": [f"k{i}" for i in range(20)], "text": [f"a good plot {i}" for i in range(20)]})
    pq.write_table(table, path, row_group_size=10, compression="none", use_dictionary=False)
    offset = pq.ParquetFile(path).metadata.row_group(1).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 12] = b"\xff" * 12
    path.write_bytes(bytes(data))
    read = list(read_validated_file(str(path), PRESETS["sst2"], False, storage.content_digest(str(path))))
    reasons = pa.concat_tables([v.errors for v in read]).column("reason").to_pylist()
    assert len(reasons) == 10 and all(r.startswith("unreadable Parquet data (row group 1): OSError: ") for r in reasons)
    assert all("\n" not in r and "page header failed" in r for r in reasons)


def test_6d_a_footer_whose_row_groups_do_not_add_up_is_a_bad_file(segment_artifacts, db, tmp_path):  # noqa: F811
    """A damaged footer gave a row group -61 rows: its rows were never read nor rejected (exit 3, found by fuzzing)."""
    path = tmp_path / "footer.parquet"
    pq.write_table(pa.table({"text": sentences(40, 9)}), path, row_group_size=10)
    data = path.read_bytes()
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    for at in range(footer, len(data) - 8):  # the byte holding row group 1's row count (zigzag varint 20 = 10 rows)
        damaged = data[:at] + bytes([0x79]) + data[at + 1 :]  # -61
        path.write_bytes(damaged)
        try:
            if pq.ParquetFile(path).metadata.row_group(1).num_rows == -61:
                break
        except (OSError, pa.ArrowException):
            pass
    else:
        pytest.fail("no byte of the footer holds row group 1's row count")
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "out", path))
    assert (
        run.returncode == 2
        and "a damaged footer: it counts 40 rows, its row groups 10, -61, 10, 10" in one_error_line(run)
    )
    assert not (tmp_path / "out").exists()


def test_6c_a_column_name_not_in_utf8_is_a_bad_file_not_an_internal_error(segment_artifacts, db, tmp_path):  # noqa: F811
    legacy = tmp_path / "legacy.parquet"
    pq.write_table(pa.table({"text": ["good", "bad"], "cafQ": [1, 2]}), legacy, store_schema=False)
    legacy.write_bytes(legacy.read_bytes().replace(b"cafQ", b"caf\xe9"))  # as a writer in Latin-1 leaves it
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "out", legacy))
    assert run.returncode == 2 and f"{legacy}: not a readable Parquet file" in one_error_line(run)
    assert not (tmp_path / "out").exists()


def test_7_dictionary_and_binary_text_are_text_wrong_types_are_refused(segment_artifacts, db, tmp_path):  # noqa: F811
    texts = sentences(6, 7)
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), tmp_path / "dict.parquet")
    pq.write_table(pa.table({"text": pa.array([t.encode() for t in texts], pa.binary())}), tmp_path / "bin.parquet")
    pq.write_table(pa.table({"text": pa.array(texts, pa.string_view())}), tmp_path / "view.parquet")  # as polars
    assert pq.read_schema(tmp_path / "view.parquet").field("text").type == pa.string_view()
    for name in ("dict", "bin", "view"):
        run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / name, tmp_path / f"{name}.parquet"))
        assert run.returncode == 0 and "rows in: 6  predicted: 6  rejected: 0" in run.stdout, run.stderr
        assert read_folder(tmp_path / name, "predictions").column("text").to_pylist() == texts
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "int.parquet")
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "int", tmp_path / "int.parquet"))
    assert run.returncode == 2 and "column 'text' has type int64, which cannot hold text" in one_error_line(run)
    assert not (tmp_path / "int").exists()


def test_8_append_refuses_duplicates_and_keys_id_less_rows_by_content(segment_artifacts, tmp_path):  # noqa: F811
    db = tmp_path / "db"
    first = labelled(tmp_path / "a.parquet", 6, 3, "a", bad=False)
    assert raee_ops(*build_args(segment_artifacts, db, first, table="t")).returncode == 0
    twice = tmp_path / "twice.parquet"
    pq.write_table(pa.table({"id": ["n1", "n2", "n1"], "text": ["good", "bad", "fun"], "label": [1, 0, 1]}), twice)
    run = raee_ops(*build_args(segment_artifacts, db, twice, table="t", extra=["--mode", "append"]))
    assert run.returncode == 2 and "1 id(s) occur more than once in the input (e.g. n1)" in one_error_line(run)
    idless = tmp_path / "idless.parquet"
    pq.write_table(pa.table({"text": sentences(4, 8), "label": [0, 1, 0, 1]}), idless)
    assert raee_ops(*build_args(segment_artifacts, db, idless, table="t", extra=["--mode", "append"])).returncode == 0
    (tmp_path / "sub").mkdir()
    respelt = tmp_path / "sub" / ".." / "idless.parquet"
    copied = shutil.copy(idless, tmp_path / "copy.parquet")
    run = raee_ops(*build_args(segment_artifacts, db, respelt, table="t", extra=["--mode", "append"]))
    assert run.returncode == 0 and "already done" in run.stdout  # the same file: the job the table came from
    for again in (copied, first):  # the same rows in another file, rows of an earlier run: refused
        run = raee_ops(*build_args(segment_artifacts, db, again, table="t", extra=["--mode", "append"]))
        assert run.returncode == 2 and "id(s) already in table 't'" in one_error_line(run)
    assert table_state(db, "t")[0] == 10


def test_10_bad_locations_fail_fast_and_create_nothing(segment_artifacts, db, tmp_path):  # noqa: F811
    queries = labelled(tmp_path / "q.parquet", 3, 1, "q", bad=False)
    (tmp_path / "afile").write_text("x")
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "afile", queries))
    assert run.returncode == 2 and "exists and is not a directory" in one_error_line(run)
    run = raee_ops(*classify_args(segment_artifacts, tmp_path / "no-such-db", tmp_path / "out", queries))
    assert run.returncode == 2 and "no LanceDB database at" in one_error_line(run)
    assert not (tmp_path / "no-such-db").exists() and not (tmp_path / "out").exists()
    run = raee_ops(
        *build_args(segment_artifacts, tmp_path / "new-db", queries, extra=["--errors", tmp_path / "afile/e"])
    )
    assert run.returncode == 2 and "afile is a file, not a directory" in one_error_line(run)  # before any work
    assert not (tmp_path / "new-db").exists()
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "out[1]", queries))
    assert run.returncode == 2 and "may not hold glob characters" in one_error_line(run)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "_SUCCESS").write_text("")  # a classify output
    run = raee_ops(*build_args(segment_artifacts, db, queries, extra=["--errors", tmp_path / "done"]))
    assert run.returncode == 2 and "holds another job's complete output" in one_error_line(run)
    # a URL short of its '//': made absolute first, it was a local folder 's3:' in the working directory, exit 0
    (tmp_path / "cwd").mkdir()
    run = raee_ops(*classify_args(segment_artifacts, db, "s3:/bucket/x", queries), cwd=tmp_path / "cwd")
    assert run.returncode == 2 and "--output s3:/bucket/x: write s3://…" in one_error_line(run)
    run = raee_ops(*build_args(segment_artifacts, db, queries, extra=["--errors", "file:/tmp/e"]), cwd=tmp_path / "cwd")
    assert run.returncode == 2 and "--errors file:/tmp/e: write file://…" in one_error_line(run)
    assert not list((tmp_path / "cwd").iterdir())
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.json").write_text("{}")  # another tool's report.json: a folder like another
    (tmp_path / "report" / "report.md").write_text("notes")
    run = raee_ops(*build_args(segment_artifacts, tmp_path / "db3", queries, extra=["--errors", tmp_path / "report"]))
    assert run.returncode == 0, run.stderr
    evaluated = {"default_strategy": "probe-fused", "strategies": {}, "baselines": {}}
    (tmp_path / "report" / "report.json").write_text(json.dumps(evaluated))  # an evaluate report: read whole, its
    run = raee_ops(*build_args(segment_artifacts, db, queries, extra=["--errors", tmp_path / "report"]))  # predictions
    assert run.returncode == 2 and "holds another job's complete output (report.json)" in one_error_line(run)
    # a user's Parquet (a file, a folder of them) was read with the rejected rows by a reader of the folder, exit 0
    # by content: Hive's file names have no suffix (recheck, session 66)
    for folder, held in (
        (tmp_path / "mixed", "mine.parquet"),
        (tmp_path / "mixed2", "old/x.parquet"),
        (tmp_path / "mixed3", "000000_0"),
        (tmp_path / "mixed4", "sub/part.parq"),
    ):
        (folder / held).parent.mkdir(parents=True)
        shutil.copy(queries, folder / held)
        run = raee_ops(*build_args(segment_artifacts, db, queries, extra=["--errors", folder]))
        line = one_error_line(run)
        assert run.returncode == 2 and f"holds {held.split('/')[0]}, Parquet no build-db wrote" in line, line
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    run = raee_ops(*build_args(segment_artifacts, tmp_path / "gone" / "db", queries))
    assert run.returncode == 2 and "gone is a link to nothing" in one_error_line(run)
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "gone" / "out", queries))
    assert run.returncode == 2 and "gone is a link to nothing" in one_error_line(run)
    if sys.platform == "linux":  # /proc refuses a new folder with ENOENT, even to root, who may write in it
        run = raee_ops(*classify_args(segment_artifacts, db, f"/proc/raee-test-{os.getpid()}", queries))
        line = one_error_line(run)
        assert run.returncode == 2 and "/proc" in line and "internal error" not in line, line


def test_outputs_inside_the_database_are_refused_before_any_work(segment_artifacts, db, tmp_path):  # noqa: F811
    """Parquet written among LanceDB's own files (a table's folder, the database's) would be read as neither."""
    queries = labelled(tmp_path / "q.parquet", 3, 1, "q", bad=False)
    before = sorted(p.relative_to(db) for p in db.rglob("*"))
    for inside in (db / "sst2.lance" / "out", db / "out", db):
        run = raee_ops(*classify_args(segment_artifacts, db, inside, queries))
        assert run.returncode == 2 and f"--output {inside}: inside the database {db}" in one_error_line(run)
    link = tmp_path / "db-link"
    link.symlink_to(db)
    run = raee_ops(*classify_args(segment_artifacts, db, link / "out", queries))
    assert run.returncode == 2 and "inside the database" in one_error_line(run)
    # another table's errors folder too: that table's overwrite empties it, taking this table's rejected rows
    for inside in (db / "sst2.lance" / "errors", db / "_raee-work" / "sst2" / "errors", db, db / "_errors" / "alt"):
        run = raee_ops(*build_args(segment_artifacts, db, queries, extra=["--errors", inside]))
        assert run.returncode == 2 and f"--errors {inside}: inside the database {db}" in one_error_line(run)
    report = ["evaluate", "--artifacts", segment_artifacts, "--task", "sst2", "--db", db, "--input", queries]
    run = raee_ops(*report, "--report", db / "report")
    assert run.returncode == 2 and f"--report {db / 'report'}: inside the database {db}" in one_error_line(run)
    assert sorted(p.relative_to(db) for p in db.rglob("*")) == before  # nothing created, the table unchanged
    run = raee_ops(*build_args(segment_artifacts, tmp_path / "db2", queries, extra=["--errors", db / "_errors" / "x"]))
    assert run.returncode == 0, run.stderr  # where the default folder lies, another database's rows may go
    # but not into a table's own folder there: that table's next build-db set the other database's files aside and
    # a prune deleted them (its rejected rows lost, exit 0 each time)
    own = db / "_errors" / "sst2"
    for inside in (own, own / "more", tmp_path / "db-link" / "_errors" / "sst2"):
        run = raee_ops(*build_args(segment_artifacts, tmp_path / "db3", queries, extra=["--errors", inside]))
        line = one_error_line(run)
        assert run.returncode == 2 and f"inside the errors folder of table 'sst2' in the database {db}," in line, line
    assert not (tmp_path / "db3").exists()


def test_outputs_inside_an_artifacts_folder_are_refused_before_any_work(segment_artifacts, db, tmp_path):  # noqa: F811
    """A re-export replaces its --out whole: a database, errors, predictions or a report written in an artifacts
    folder (found at the location or any folder above it, links resolved) would go with it."""
    queries = labelled(tmp_path / "q.parquet", 3, 1, "q", bad=False)
    art = tmp_path / "art"
    shutil.copytree(segment_artifacts, art)
    (tmp_path / "art-link").symlink_to(art)
    run = raee_ops(*build_args(art, art / "lancedb", queries))
    assert run.returncode == 2 and f"--db {art / 'lancedb'}: inside the artifacts folder {art}" in one_error_line(run)
    run = raee_ops(*build_args(art, tmp_path / "db2", queries, extra=["--errors", tmp_path / "art-link" / "e"]))
    assert run.returncode == 2 and f"inside the artifacts folder {art}" in one_error_line(run)
    run = raee_ops(*classify_args(art, db, art / "out" / "day1", queries))
    assert run.returncode == 2 and f"--output {art / 'out' / 'day1'}: inside the artifacts" in one_error_line(run)
    report = ["evaluate", "--artifacts", art, "--task", "sst2", "--db", db, "--input", queries, "--report", art]
    run = raee_ops(*report)
    assert run.returncode == 2 and f"--report {art}: inside the artifacts folder {art}" in one_error_line(run)
    assert sorted(p.name for p in art.iterdir()) == sorted(p.name for p in segment_artifacts.iterdir())
    assert not (tmp_path / "db2").exists()


def test_outputs_inside_another_jobs_output_are_refused_before_any_work(segment_artifacts, db, tmp_path):  # noqa: F811
    """A report written in a subfolder of a finished classify output, or a classify output in a report's: read whole
    (pq.read_table('out/') reads subfolders), the outer folder failed on the other's files, exit 0 each time."""
    queries = labelled(tmp_path / "q.parquet", 3, 1, "q", bad=False)
    out, report = tmp_path / "out", tmp_path / "report"
    main(classify_args(str(segment_artifacts), str(db), str(out), str(queries)))
    evaluate = ["evaluate", "--artifacts", segment_artifacts, "--task", "sst2", "--db", db, "--input", queries]
    run = raee_ops(*evaluate, "--report", out / "rep")
    assert run.returncode == 2 and f"--report {out / 'rep'}: inside {out}, a classify output" in one_error_line(run)
    assert raee_ops(*evaluate, "--report", report).returncode == 0
    for inside in (report / "day1", out / "day1"):
        run = raee_ops(*classify_args(segment_artifacts, db, inside, queries))
        assert run.returncode == 2 and f"--output {inside}: inside {inside.parent}, a" in one_error_line(run)
        assert not inside.exists()
    assert pq.read_table(out).num_rows == 3
    home = tmp_path / "home"  # another tool's marker and report.json far above: no output of raee-ops's
    (home / "proj").mkdir(parents=True)
    (home / "_SUCCESS").touch()  # Spark's and Hadoop's are empty
    (home / "report.json").write_text("{}")
    run = raee_ops(*classify_args(segment_artifacts, db, home / "proj" / "out", queries))
    assert run.returncode == 0, run.stderr


def test_outputs_among_or_matched_by_the_inputs_are_refused_before_any_work(segment_artifacts, db, tmp_path):  # noqa: F811
    """Outputs an --input pattern matches are read as input by the same command run again (a scheduler's retry),
    whichever command writes them; Parquet outputs written beside the inputs, or in a folder above them (readers
    take a folder whole, subfolders included; only beside them was refused), mix with them: both are refused, the
    input or the output named through a link too (sweep S: it was not, and the retry was refused). A report (no
    Parquet) may lie beside its input, but not in classify's output, nor classify's in a report (sweep S: each wrote
    into the other's, exit 0, and the folder no longer read as predictions)."""
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "data-link").symlink_to(data)
    queries = labelled(data / "q.parquet", 3, 1, "q", bad=False)
    before = sorted(tmp_path.rglob("*"))
    run = raee_ops(*classify_args(segment_artifacts, db, data, f"{data}/*.parquet"))
    assert run.returncode == 2 and f"--output {data} holds the input {queries}" in one_error_line(run)
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path, queries))  # a folder above: read whole too
    assert run.returncode == 2 and f"--output {tmp_path} holds the input {queries}" in one_error_line(run)
    run = raee_ops(*build_args(segment_artifacts, db, queries, table="t2", extra=["--errors", tmp_path]))
    assert run.returncode == 2 and f"--errors {tmp_path} holds the input {queries}" in one_error_line(run)
    run = raee_ops(*classify_args(segment_artifacts, db, data / "out", f"{data}/**.parquet"))
    line = one_error_line(run)
    assert run.returncode == 2 and f"--input {data}/**.parquet matches what this run writes to --output" in line
    assert "(predictions-00000-of-00001.parquet)" in line, line
    linked = ((f"{tmp_path}/data-link/**.parquet", data / "out"), (f"{data}/**", tmp_path / "data-link" / "out"))
    for pattern, out in linked:
        run = raee_ops(*classify_args(segment_artifacts, db, out, pattern))
        assert run.returncode == 2 and f"--input {pattern} matches what this run writes to" in one_error_line(run)
    run = raee_ops(*build_args(segment_artifacts, db, f"{data}/**", table="t2", extra=["--errors", data / "e"]))
    assert run.returncode == 2 and f"matches what this run writes to --errors {data / 'e'}" in one_error_line(run)
    report = ["evaluate", "--artifacts", segment_artifacts, "--task", "sst2", "--db", db, "--report", data]
    run = raee_ops(*report, "--input", f"{data}/*")
    assert run.returncode == 2 and f"--input {data}/* matches what this run writes to --report" in one_error_line(run)
    assert sorted(tmp_path.rglob("*")) == before  # nothing created
    run = raee_ops(*classify_args(segment_artifacts, db, data / "out", queries))  # a folder of their own: fine
    assert run.returncode == 0, run.stderr
    run = raee_ops(*classify_args(segment_artifacts, db, data / "out", queries))  # and the retry finds it done
    assert run.returncode == 0 and "already done" in run.stdout + run.stderr, run.stderr
    run = raee_ops(*report, "--input", queries, "--strategy", "probe-best")
    assert run.returncode == 0 and (data / "report.json").exists(), run.stderr
    run = raee_ops(*report[:-1], data / "out", "--input", queries, "--strategy", "probe-best")
    line = one_error_line(run)
    assert run.returncode == 2 and f"--report {data / 'out'} holds _SUCCESS, " in line and "another command's" in line
    shutil.copytree(data, tmp_path / "report", ignore=shutil.ignore_patterns("q.parquet", "out"))
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "report", queries))
    assert run.returncode == 2 and "holds predictions.parquet, report.json, report.md" in one_error_line(run)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(REPORT_FILES)


def test_inputs_from_different_writers_are_read_in_one_schema(segment_artifacts, db, tmp_path):  # noqa: F811
    """Files whose columns are ordered differently, required or not, text as large_string and integers at another
    width (pandas, polars, Spark writing the same data) are read as one; other columns, or a column of another kind,
    are refused naming the difference."""
    first = labelled(tmp_path / "a.parquet", 4, 1, "a", bad=False)
    rows = pq.read_table(labelled(tmp_path / "b0.parquet", 4, 2, "b", bad=False))
    other = pa.schema([pa.field("label", pa.int32(), False), pa.field("text", pa.large_string(), False)])
    second = tmp_path / "b.parquet"
    pq.write_table(rows.select(["label", "text", "id"]).cast(other.append(pa.field("id", pa.large_string()))), second)
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "out", first, second))
    assert run.returncode == 0 and "rows in: 8  predicted: 8  rejected: 0" in run.stdout, run.stderr
    predicted = read_folder(tmp_path / "out", "predictions")
    assert sorted(predicted.column("id").to_pylist()) == [f"{p}{i}" for p in "ab" for i in range(4)]
    assert predicted.schema.field("text").type == pa.large_string() and predicted.column_names[:3] == [
        "id",
        "text",
        "label",
    ]
    run = raee_ops(*build_args(segment_artifacts, db, first, second, table="mixed"))
    assert run.returncode == 0 and "rows in: 8  written: 8  rejected: 0" in run.stdout, run.stderr
    report = ["evaluate", "--artifacts", segment_artifacts, "--task", "sst2", "--db", db, "--strategy", "probe-best"]
    run = raee_ops(*report, "--input", first, "--input", second, "--report", tmp_path / "rep")
    assert (
        run.returncode == 0
        and "evaluated: rows in: 8  scored: 8  rejected: 0  (in = scored + rejected: ok)" in run.stdout
    ), run.stderr
    extra = tmp_path / "extra.parquet"
    pq.write_table(rows.append_column("source", pa.array(["x"] * 4)), extra)
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "out2", first, extra))
    assert run.returncode == 2 and "its columns differ from" in one_error_line(run) and "(adds: source)" in run.stderr
    named = tmp_path / "named.parquet"
    pq.write_table(rows.set_column(2, "label", pa.array(["positive"] * 4)), named)
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "out2", first, named))
    assert run.returncode == 2 and "column 'label' is string there and int64 in" in one_error_line(run)
    assert not (tmp_path / "out2").exists()


def test_13_bad_values_names_and_paths_are_configuration_errors(segment_artifacts, db, tmp_path):  # noqa: F811
    queries = labelled(tmp_path / "q-1.parquet", 5, 1, "q", bad=False)
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", queries, extra=["--max-rejected", "nan"]))
    assert run.returncode == 2 and "'nan' is not a finite number" in one_error_line(run)
    run = raee_ops(*build_args(segment_artifacts, db, queries, extra=["--layer-budget", "nan"]))
    assert run.returncode == 2 and "'nan' is not a finite number" in one_error_line(run)
    # inf too: JSON outputs (info --json, report.json) cannot hold it
    for price, why in (
        ("nan", "'nan' is not a finite"),
        ("inf", "'inf' is not a finite"),
        ("-0.1", "not in the range"),
    ):
        run = raee_ops(*build_args(segment_artifacts, db, queries, extra=["--layer-price", price]))
        assert run.returncode == 2 and why in one_error_line(run)
        run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", queries, extra=["--layer-price", price]))
        assert run.returncode == 2 and why in one_error_line(run)
    assert str(PRICE.convert("-0", None, None)) == "0.0"  # it is stored and printed: not "-0.0"
    for name, why in (("a/b", "may hold only letters"), ("sst2" + FEATURES_SUFFIX, "build-db's companion")):
        run = raee_ops(*build_args(segment_artifacts, db, queries, table=name))
        assert run.returncode == 2 and why in one_error_line(run)
        run = raee_ops("rollback", "--db", db, "--table", name, "--version", "1")
        assert run.returncode == 2 and why in one_error_line(run)
    for beam, why in (
        (["--direct_num_workers", "abc"], "invalid int value: 'abc'"),
        (["--runner", "Foo"], "--runner Foo: Unexpected pipeline runner"),
        (["--direct_num_workers=-1"], "must be 0 (every core) or more"),
    ):
        run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", queries, extra=beam))
        assert run.returncode == 2 and why in one_error_line(run)
    assert not (tmp_path / "o").exists()
    (tmp_path / "afile").write_text("x")
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "afile" / "sub", queries))
    assert run.returncode == 2 and "afile" in one_error_line(run)
    assert table_state(db)[0] == 30
    run = raee_ops(*classify_args(segment_artifacts, db, "out", "q-*.parquet"), cwd=tmp_path)  # a bare glob: here
    assert run.returncode == 0, run.stderr
    assert read_folder(tmp_path / "out", "predictions").num_rows == 5
    # a relative location is made absolute as the system resolves it: `..` after a link is the link's target's
    # parent (collapsed as text, the run wrote beside the link, where info of the same spelling found nothing)
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    (tmp_path / "lnk").symlink_to(tmp_path / "elsewhere" / "sub")
    run = raee_ops(*classify_args(segment_artifacts, db, "lnk/../o2", "q-*.parquet"), cwd=tmp_path)
    assert run.returncode == 0 and not (tmp_path / "o2").exists(), run.stderr
    assert read_folder(tmp_path / "elsewhere" / "o2", "predictions").num_rows == 5


def test_14b_a_name_that_is_not_utf8_is_refused_before_anything_is_made(segment_artifacts, db, tmp_path):  # noqa: F811
    """Bytes that are not UTF-8 in a location (or a Beam option) failed in Beam: an internal error (exit 1) on the
    driver, or in a worker with exit 0 and no output; the output folder was made first (sweep, session 67)."""
    queries = labelled(tmp_path / "q.parquet", 5, 1, "q", bad=False)
    odd = os.fsdecode(b"\xff")
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / f"o{odd}", queries))
    assert run.returncode == 2 and f"'--output': {tmp_path}/o\\xff is not UTF-8" in one_error_line(run)
    run = raee_ops(*build_args(segment_artifacts, tmp_path / f"db{odd}", queries))
    assert run.returncode == 2 and "'--db':" in one_error_line(run) and "is not UTF-8" in one_error_line(run)
    extra = ["--temp_location", str(tmp_path / f"t{odd}")]
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", queries, extra=extra))
    assert run.returncode == 2 and f"{tmp_path}/t\\xff is not UTF-8" in one_error_line(run)
    (tmp_path / "in").mkdir()
    shutil.copy(queries, tmp_path / "in" / f"x{odd}.parquet")
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", f"{tmp_path}/in/*.parquet"))
    assert run.returncode == 2 and "x\\xff.parquet: a file name that is not UTF-8" in one_error_line(run)
    (tmp_path / f"cwd{odd}").mkdir()  # a relative location below a working directory so named (recheck)
    run = raee_ops(*classify_args(segment_artifacts, db, "out", queries), cwd=tmp_path / f"cwd{odd}")
    assert run.returncode == 2 and "cwd\\xff/out is not UTF-8" in one_error_line(run)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", "q.parquet", f"cwd{odd}"])
    assert list((tmp_path / f"cwd{odd}").iterdir()) == []


def test_1c_a_refusal_names_the_other_jobs_settings_and_inputs_readably():
    """What the refusal of another job's output says (recheck, session 67): options as spelt, a setting left to the
    table 'not given' (it printed None), inputs by path (a partition's files share their names, and the line said
    `part-0.parquet: not among its inputs; part-0.parquet: its inputs, not this run's`), long values cut."""
    from raee_ops.commit import Job

    mine = Job("a", {"k": 10, "layer_price": 0.2}, [["/in/day=2/part-0.parquet", 5, "x"]], {})
    theirs = {"settings": {"k": "9" * 500, "layer_price": None}, "inputs": [["/in/day=1/part-0.parquet", 5, "x"]]}
    said = mine.differences(theirs)
    assert said.startswith(" of another job (its --k was 999") and "..., this run's 10;" in said
    assert "its --layer-price was not given, this run's 0.2" in said and len(said) < 400
    assert "/in/day=2/part-0.parquet: not among its inputs; /in/day=1/part-0.parquet: its inputs, not" in said
    assert mine.differences({"settings": [], "inputs": 5}) == ""  # a marker that does not say: no detail
    # an earlier release's marker (its job named otherwise, no settings kept): said so, where nothing was said
    assert mine.differences({"job": "b"}).startswith(" of a job an earlier raee-ops recorded without its settings")


def test_14_what_would_crash_late_or_be_guessed_is_refused_first(segment_artifacts, db, tmp_path):  # noqa: F811
    queries = labelled(tmp_path / "q.parquet", 5, 1, "q", bad=False)
    internal = tmp_path / "internal.parquet"
    pq.write_table(pq.read_table(queries).append_column("_row_id", pa.array(range(5))), internal)
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", internal))
    assert run.returncode == 2 and "column(s) _row_id are raee-ops' own" in one_error_line(run)
    for folder in (f"{tmp_path}/", tmp_path):  # with its slash or without
        run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", folder))
        assert run.returncode == 2 and f"a folder; give its files or a glob ({tmp_path}/*.parquet)" in one_error_line(
            run
        )
    for twice in (
        ["--strategy", "probe-fused", "--strategy", "probe-best"],
        ["--max-rejected", "0", "--max-rejected=1"],
        ["--output", tmp_path / "o2"],
    ):
        run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", queries, extra=twice))
        assert run.returncode == 2 and f"'{twice[0]}': given 2 times; give it once" in one_error_line(run)
    for empty, instead in ((["--table", ""], " or leave the option out"), (["--input", ""], "")):
        run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", queries, extra=empty))
        line = one_error_line(run)  # a required option cannot be left out
        assert run.returncode == 2 and f"'{empty[0]}': is empty (an unset variable?); give a value{instead}" in line
        assert instead or "leave the option out" not in line
    for beam, why in (  # Beam's options too: argparse kept the last value and took an empty one
        (["--raee_provider", "cpu", "--raee_provider=cuda"], "--raee_provider given twice; give it once"),
        (["--temp_location", ""], "--temp_location is empty (an unset variable?)"),
        (["--save_main_session", "--no_save_main_session"], "--save_main_session and --no_save_main_session: give"),
    ):
        run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", queries, extra=beam))
        assert run.returncode == 2 and why in one_error_line(run), run.stderr
    run = raee_ops(*build_args(segment_artifacts, db, queries, extra=["--errors", " "]))
    assert run.returncode == 2 and "'--errors': is empty" in one_error_line(run)
    run = raee_ops(*build_args(segment_artifacts, "", queries), cwd=tmp_path)
    assert run.returncode == 2 and "'--db': is empty" in one_error_line(run) and not (tmp_path / "sst2.lance").exists()
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o", queries, extra=["-q", "-q", "-v", "-v"]))
    assert run.returncode == 0, run.stderr  # a bare flag or a count said twice leaves nothing to guess
    shutil.rmtree(tmp_path / "o")
    assert not (tmp_path / "o").exists()
    evaluate = ["evaluate", "--artifacts", segment_artifacts, "--task", "sst2", "--db", db, "--input", queries]
    (tmp_path / "afile").write_text("x")
    run = raee_ops(*evaluate, "--report", tmp_path / "afile")
    assert run.returncode == 2 and "exists and is not a directory" in one_error_line(run)
    for option in ("--layer-budget", "--layer-price"):
        run = raee_ops(*evaluate, "--report", tmp_path / "r", "--strategy", "probe-best", option, "0.5")
        assert run.returncode == 2 and f"{option} sets probe-fused's" in one_error_line(run)
        assert "cost; 'probe-best' has none" in one_error_line(run)  # as classify says it
        run = raee_ops(*evaluate, "--report", tmp_path / "r", "--strategy", "raee", "--strategy", "full", option, "1")
        assert "cost; none of raee, full has one" in one_error_line(run)
    assert not (tmp_path / "r").exists()


def test_11_no_third_party_noise_unless_verbose(segment_artifacts, tmp_path):  # noqa: F811
    train = labelled(tmp_path / "train.parquet", 8, 0, "t", bad=False)
    run = raee_ops(*build_args(segment_artifacts, tmp_path / "db", train), fresh=True)  # noise comes at import
    assert run.returncode == 0 and run.stdout.startswith("build-db sst2 (overwrite)"), run.stderr
    assert "WARN" not in run.stderr and "apitools" not in run.stderr
    assert "table version" in run.stdout
    run = raee_ops(*build_args(segment_artifacts, tmp_path / "db2", train, extra=["-q"]))  # import noise: above
    assert run.returncode == 0 and run.stdout == "" and run.stderr == ""


def test_12_a_failed_job_and_failed_counts_are_not_exit_0(segment_artifacts, db, tmp_path, monkeypatch):  # noqa: F811
    queries = labelled(tmp_path / "q.parquet", 5, 1, "q", bad=False)
    args = classify_args(segment_artifacts, db, tmp_path / "out", queries)
    run = raee_ops(*args, fault="load:classify", mode="raise")
    assert run.returncode == 1
    assert "classify pipeline failed in a Beam worker" in one_error_line(run) and "injected fault" in run.stderr
    assert not (tmp_path / "out" / "_SUCCESS").exists() and not list((tmp_path / "out").glob("*.parquet"))

    from raee_ops.pipelines import classify as classify_module

    from raee_ops.errors import CountMismatch

    real = classify_module.count_rows
    monkeypatch.setattr(classify_module, "count_rows", lambda p: (lambda n, f: (n + 1, f))(*real(p)))
    with pytest.raises(CountMismatch, match="nothing published") as refused:
        out = str(tmp_path / "o2")
        classify_module.run_classify(segment_artifacts, "sst2", str(db), "sst2", [str(queries)], out, 5, "raee")
    assert not list((tmp_path / "o2").iterdir()) and "visible" not in str(refused.value)
    # nothing staged at all: what workers on other machines writing to their own disks look like, said so
    monkeypatch.setattr(classify_module, "count_rows", lambda p: (0, []))
    with pytest.raises(CountMismatch, match="no staged file is visible here: workers on other machines need --output"):
        out = str(tmp_path / "o3")
        classify_module.run_classify(segment_artifacts, "sst2", str(db), "sst2", [str(queries)], out, 5, "raee")
    monkeypatch.undo()
    rejected = tmp_path / "mostly-bad.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["good", None, " "]}), rejected)
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o3", rejected))
    assert run.returncode == 4 and "2 of 3 rows rejected (a share of 0.667), over --max-rejected 0.5" in one_error_line(
        run
    )
    assert (tmp_path / "o3" / "_SUCCESS").exists()  # the outputs are complete; the exit code flags them
    retry = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "o3", rejected))  # done, flagged again
    assert retry.returncode == 4 and "already done" in retry.stdout
    assert read_folder(tmp_path / "o3", "predictions").num_rows == 1
    assert sorted(read_folder(tmp_path / "o3", "_errors").column("id").to_pylist()) == ["b", "c"]


def test_19_a_broken_artifact_fails_the_job_it_never_rejects_the_rows(segment_artifacts, tmp_path):  # noqa: F811
    """A head that loads only when a batch first reads it, broken under a matching checksum: every row of every
    batch fails, so the worker is at fault, not the rows; no --max-rejected may turn that into a complete run."""
    broken = tmp_path / "artifacts"
    shutil.copytree(segment_artifacts, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    head = manifest["tasks"]["sst2"]["head"]
    (broken / head["file"]).write_bytes(b"not an onnx graph")
    head["sha256"] = hashlib.sha256(b"not an onnx graph").hexdigest()
    (broken / "manifest.json").write_text(sealed(manifest))
    train = labelled(tmp_path / "train.parquet", 8, 0, "t", bad=False)
    run = raee_ops(*build_args(broken, tmp_path / "db", train, extra=["--max-rejected", "1", "--allow-empty"]))
    assert run.returncode == 1 and "inference failed on every row of a batch" in one_error_line(run), run.stderr
    assert "sst2" not in table_names(lancedb.connect(str(tmp_path / "db")))
    assert not list((tmp_path / "db").rglob("errors-*.parquet"))  # no row published as rejected


def test_a_backbone_failing_every_row_that_runs_a_layer_fails_the_job():
    """A backbone broken under a matching checksum (a manifest's readout the runtime does not know): classify's
    default answered some rows at exit 0, without a layer, and rejected the rest with the backbone's error, exit 0.
    Rows kept only where no layer ran do not clear the worker; one row that ran a layer and was answered does."""

    class Broken(Classify):
        def __init__(self) -> None:  # no artifacts: predict stands in for the runtime
            pass

        def runs_backbone(self, model: object) -> bool:
            return True

        def predict(self, model: object, table: pa.Table, prompts: list[str]) -> pa.Table:
            if any(p.startswith("deep") for p in prompts):
                raise ValueError("a prompt has no mask token to read out")
            exits = [int(p.startswith("ran")) for p in prompts]
            return pa.table({"id": table.column(ROW_ID), "exit_layer": pa.array(exits, pa.int32())})

    model = SimpleNamespace(context=SimpleNamespace(key_depth=0))
    rows = pa.table({ROW_ID: ["a", "b"], SOURCE: ["f.parquet"] * 2})
    with pytest.raises(RaeeRunError, match="inference failed on every row of a batch that runs a layer"):
        Broken().predicted(model, rows, ["zero", "deep"])
    kept, failed = Broken().predicted(model, rows, ["ran", "deep"])  # the backbone answered a row: that one is at fault
    assert [t.column("id").to_pylist() for t in kept] == [["a"]] and [t.column("id").to_pylist() for t in failed] == [
        ["b"]
    ]
    layer_key = SimpleNamespace(context=SimpleNamespace(key_depth=2))  # its exit 0 ran the key's layers
    assert len(Broken().predicted(layer_key, rows, ["zero", "deep"])[0]) == 1


def test_a_versions_record_names_the_jobs_whose_rows_it_holds():
    """An append continues its base's jobs (seeded with the base's own run where its release recorded none), an
    overwrite starts them anew (a re-append of an earlier job is then no 'already done': its rows are gone), and
    only the newest JOBS_KEPT are kept, so the schema's metadata does not grow with the table's age."""
    schema = pa.schema([("x", pa.int8())])
    first = RunRecord.new("r0", "overwrite", "J0", 1, None)
    assert first.run_of("J0") == first and first.jobs == first.entry()
    old = RunRecord("r0", "overwrite", "J0", 1, ["r0"])  # as an earlier release recorded it: no jobs
    onto_old = RunRecord.new("r1", "append", "J1", 0, schema.with_metadata(old.metadata()))
    assert onto_old.run_of("J0") == RunRecord("r0", "overwrite", "J0", 1) and onto_old.lineage == ["r0", "r1"]
    version = first
    for n in range(1, 80):
        version = RunRecord.new(f"r{n}", "append", f"J{n}", n, schema.with_metadata(version.metadata()))
    assert version.run_of("J79") == version and version.run_of("J16") == RunRecord("r16", "append", "J16", 16)
    assert version.run_of("J15") is None and len(version.jobs) == JOBS_KEPT == 64 and len(version.lineage) == 80
    assert RunRecord.of(schema.with_metadata(version.metadata())) == version
    replaced = RunRecord.new("r80", "overwrite", "J80", 0, schema.with_metadata(version.metadata()))
    assert replaced.run_of("J79") is None and replaced.lineage == ["r80"]


@pytest.mark.parametrize("recorded", ["lineage", "history"])
def test_an_append_retried_after_another_committed_finds_its_rows_done(
    segment_artifacts,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
    recorded,
):
    """An append killed after its commit, retried after another append committed: its rows are in the table, but
    'already done' looked at the current version's run only, and the retry was refused for their ids (exit 2, which
    a scheduler does not retry: a finished job reported failed for good). The current version's lineage records
    its job, even once a prune removed the version it wrote (the history held it no more: exit 2 again); a table
    written before lineages recorded jobs is found in the history."""
    db = tmp_path / "db"
    inputs = [labelled(tmp_path / f"{name}.parquet", 8, seed, name, bad=False) for seed, name in enumerate("abc")]
    append = ["--mode", "append"]
    assert raee_ops(*build_args(segment_artifacts, db, inputs[0])).returncode == 0
    killed = raee_ops(*build_args(segment_artifacts, db, inputs[1], extra=append), fault="commit:table")
    assert killed.returncode == -signal.SIGKILL and table_state(db) == (16, 2)
    assert raee_ops(*build_args(segment_artifacts, db, inputs[2], extra=append)).returncode == 0
    if recorded == "lineage":
        pruned = raee_ops("prune", "--db", str(db), "--table", "sst2", "--keep", "1", "--grace", "0")
        assert pruned.returncode == 0 and "removed versions 1-2" in pruned.stdout, pruned.stdout + pruned.stderr
        retry = raee_ops(*build_args(segment_artifacts, db, inputs[1], extra=append))
        assert retry.returncode == 0 and "already done: table version 3 holds" in retry.stdout, retry.stderr
    else:
        monkeypatch.setattr(RunRecord, "run_of", lambda self, job: self if self.job == job else None)
        capsys.readouterr()
        main(build_args(str(segment_artifacts), str(db), str(inputs[1]), extra=append))
        assert "already done: table version 3 holds" in capsys.readouterr().out
    assert table_state(db)[0] == 24


@pytest.mark.parametrize("then", ["append", "prune"])
def test_a_run_killed_after_its_commit_keeps_its_rejected_rows_through_a_rollback(segment_artifacts, tmp_path, then):  # noqa: F811
    """Killed between committing its version and publishing its rejected rows, then rolled back past: the next run
    still publishes them (the version is in the table's history), set aside in _replaced/ since the current version
    does not hold that run's rows, where a rollback to it would bring them back; a prune that removes that version
    removes them too."""
    db = tmp_path / "db"
    inputs = [labelled(tmp_path / f"{name}.parquet", 8, seed, name) for seed, name in enumerate("abc")]
    assert raee_ops(*build_args(segment_artifacts, db, inputs[0])).returncode == 0
    append = ["--mode", "append"]
    killed = raee_ops(*build_args(segment_artifacts, db, inputs[1], extra=append), fault="commit:table")
    assert killed.returncode == -signal.SIGKILL and table_state(db)[1] == 2
    assert raee_ops("rollback", "--db", db, "--table", "sst2", "--version", "1").returncode == 0
    if then == "append":
        run = raee_ops(*build_args(segment_artifacts, db, inputs[2], extra=append))
    else:
        run = raee_ops("prune", "--db", db, "--table", "sst2", "--keep", "1", "--grace", "0")
        assert "removed versions 1-2; kept version 3" in run.stdout
    assert run.returncode == 0, run.stderr
    published = ds.dataset(db / "_errors" / "sst2", format="parquet").to_table().column("file").to_pylist()
    assert sorted({Path(f).name for f in published}) == (
        ["a.parquet", "c.parquet"] if then == "append" else ["a.parquet"]
    )
    aside = sorted((db / "_errors" / "sst2" / "_replaced").glob("errors-*.parquet"))
    replaced = {Path(f).name for f in ds.dataset(aside).to_table().column("file").to_pylist()} if aside else set()
    assert replaced == ({"b.parquet"} if then == "append" else set())  # kept while version 2 is


def test_a_table_built_with_another_prompt_is_refused(segment_artifacts, db, tmp_path):  # noqa: F811
    """Same backbone, the task exported again with another template: the table's exit information came from other
    prompts."""
    other = reexported(
        segment_artifacts,
        tmp_path / "artifacts",
        lambda m: m["tasks"]["sst2"].update(template="Review: {text} Verdict:"),
    )
    queries = labelled(tmp_path / "q.parquet", 3, 1, "q", bad=False)
    run = raee_ops(*classify_args(other, db, tmp_path / "out", queries))
    assert run.returncode == 2 and "the task's prompt, labels or head differ" in one_error_line(run)
    assert not (tmp_path / "out").exists()


def damaged_copy(db: Path, to: Path, table: str, damage: str) -> Path:
    """The database's tables (not what other tests' runs left beside them), `table`'s data files deleted or cut
    (or, with damage "none", left whole)."""
    shutil.copytree(
        db, to, ignore=lambda folder, names: [n for n in names if n.startswith("_")] if folder == str(db) else []
    )
    for data in (to / f"{table}.lance" / "data").glob("*.lance") if damage != "none" else ():
        data.unlink() if damage == "deleted" else os.truncate(data, data.stat().st_size // 2)
    return to


@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_a_table_whose_data_files_are_damaged_is_refused_before_any_work(segment_artifacts, db, tmp_path, damage):  # noqa: F811
    """Its manifest still names the files: the workers' first search used to fail the job (exit 1, a worker's
    error); now the driver reads every row's label first and refuses it in one line."""
    damaged = damaged_copy(db, tmp_path / "db", "sst2", damage)
    queries = labelled(tmp_path / "q.parquet", 3, 1, "q", bad=False)
    run = raee_ops(*classify_args(segment_artifacts, damaged, tmp_path / "out", queries))
    line = one_error_line(run)
    assert run.returncode == 2 and line.startswith(f"error: table 'sst2' in {damaged} cannot be read (damaged"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("table", ["sst2", "sst2" + FEATURES_SUFFIX])
def test_append_to_a_table_with_damaged_data_files_is_refused_before_the_work(segment_artifacts, db, tmp_path, table):  # noqa: F811
    """The companion's rows are read only for the refit, after every row ran the backbone: it used to fail there
    as an internal error (exit 1). Now both tables are read under the claim, before the work; nothing changes."""
    before = table_state(db)
    damaged = damaged_copy(db, tmp_path / "db", table, "deleted")
    more = labelled(tmp_path / "more.parquet", 4, 7, "more", bad=False)
    run = raee_ops(*build_args(segment_artifacts, damaged, more, extra=["--mode", "append"]))
    line = one_error_line(run)
    said = f"table {table!r} in {damaged} cannot be read (damaged"
    if table != "sst2":  # the companion: what it holds and what mends it (build-db refuses it by its own name)
        said = f"append refused: table {table!r} in {damaged}, the old rows' features the probes are refitted on, "
        said += "cannot be read (damaged"
        assert line.endswith("away and rebuild table 'sst2' (build-db --mode overwrite)"), line
    assert run.returncode == 2 and line.startswith(f"error: {said}"), line
    assert "inference" not in run.stderr and table_state(damaged) == before


def test_append_to_a_table_whose_companion_is_gone_is_refused_before_the_work(segment_artifacts, db, tmp_path):  # noqa: F811
    """The companion (the old rows' features the probes are refitted on) deleted: the append ran every row through
    the backbone, then said the table "was built before probe heads", which it was not, leaving staged errors."""
    before = table_state(db)
    copy = damaged_copy(db, tmp_path / "db", "sst2", "none")
    shutil.rmtree(copy / f"sst2{FEATURES_SUFFIX}.lance")
    more = labelled(tmp_path / "more.parquet", 4, 7, "more", bad=False)
    run = raee_ops(*build_args(segment_artifacts, copy, more, extra=["--mode", "append"]))
    line = one_error_line(run)
    assert (
        run.returncode == 2
        and f"append refused: table 'sst2{FEATURES_SUFFIX}' in {copy}, the old rows' features" in line
    )
    assert "inference" not in run.stderr and table_state(copy) == before
    assert not list(copy.glob("_errors/**/*.parquet")), list(copy.glob("_errors/**/*"))


def test_a_table_another_program_keeps_is_neither_appended_to_nor_replaced(segment_artifacts, db, tmp_path):  # noqa: F811
    """A LanceDB table build-db did not write (a misspelt --table naming another program's): append was refused
    under the claim as 'replaced since this run began', which nothing had, leaving its work folder; overwrite
    replaced it without a word. Both are refused before any work, creating nothing."""
    copy = tmp_path / "db"
    shutil.copytree(db, copy)
    lancedb.connect(str(copy)).create_table("notes", pa.table({"x": [1, 2, 3]}))
    train = labelled(tmp_path / "train.parquet", 12, 0, "t", bad=False)
    for mode, said in (("append", "has no raee metadata"), ("overwrite", "does not replace it")):
        run = raee_ops(*build_args(segment_artifacts, copy, train, table="notes", extra=["--mode", mode]))
        line = one_error_line(run)
        assert run.returncode == 2 and "table 'notes'" in line and said in line and "replaced since" not in line
    assert table_state(copy, "notes") == (3, 1) and not (copy / "_raee-work" / "notes").exists()


def test_a_row_that_fails_where_its_batch_runs_is_rejected_alone(segment_artifacts, tmp_path, monkeypatch):  # noqa: F811
    rows = labelled(tmp_path / "rows.parquet", 4, 0, "r", bad=False)
    table = next(iter(read_validated_file(str(rows), PRESETS["sst2"], True, storage.content_digest(str(rows))))).valid
    work = LayerRows(str(segment_artifacts), PRESETS["sst2"], "backbone")
    model, real = work.load(), LayerRows.predict

    def poisoned(self, model, batch, prompts):
        if "r2" in batch.column(ROW_ID).to_pylist():
            raise ValueError("poison")
        return real(self, model, batch, prompts)

    monkeypatch.setattr(LayerRows, "predict", poisoned)
    outcome = work.run(table, model)
    assert outcome.rows.column("id").to_pylist() == ["r0", "r1", "r3"]
    assert outcome.errors.select(["id", "reason"]).to_pylist() == [
        {"id": "r2", "reason": "inference failed: ValueError('poison')"}
    ]

    def broken(self, model, batch, prompts):
        raise ValueError("broken")

    monkeypatch.setattr(LayerRows, "predict", broken)
    with pytest.raises(RaeeRunError, match="every row of a batch: ValueError"):
        work.run(table, model)


def test_15_errors_on_another_filesystem_than_the_database(segment_artifacts, tmp_path):  # noqa: F811
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's temp folder")
    errors = shm / f"raee-test-errors-{os.getpid()}"
    try:
        train = labelled(tmp_path / "t.parquet", 12, 3, "t")
        run = raee_ops(*build_args(segment_artifacts, tmp_path / "db", train, extra=["--errors", errors]))
        assert run.returncode == 0, run.stderr  # staged beside --errors: publishing is a rename there
        assert ds.dataset(str(errors)).count_rows() == 5
    finally:
        shutil.rmtree(errors, ignore_errors=True)


def test_18_databases_sharing_an_errors_folder_keep_each_others_rows(segment_artifacts, tmp_path):  # noqa: F811
    shared, train = tmp_path / "errors", labelled(tmp_path / "t.parquet", 12, 3, "t")
    on_a, on_b = (build_args(segment_artifacts, tmp_path / db, train, extra=["--errors", shared]) for db in "ab")
    assert raee_ops(*on_a, fault="commit:table").returncode == -9  # committed, its rejected rows still staged
    assert raee_ops(*on_b).returncode == 0
    assert ds.dataset(str(shared)).count_rows() == 5  # b's; a's staged rows untouched
    assert raee_ops(*on_a).returncode == 0
    assert ds.dataset(str(shared)).count_rows() == 15  # a's killed run's (published by its next run), b's, a's


def test_a_retry_naming_the_database_by_a_link_publishes_the_killed_runs_rejected_rows(segment_artifacts, tmp_path):  # noqa: F811
    """A run killed between its commit and publishing its errors leaves them staged under the database's digest: a
    next run naming the database through a link (or the link's target) looked under another digest, said it
    settled the earlier run, and never published them. Every spelling of one database is one digest."""
    (tmp_path / "real").mkdir()
    link, train = tmp_path / "link", labelled(tmp_path / "t.parquet", 12, 3, "t")
    link.symlink_to(tmp_path / "real")
    assert raee_ops(*build_args(segment_artifacts, link / "db", train), fault="commit:table").returncode == -9
    again = labelled(tmp_path / "t2.parquet", 12, 4, "u")
    append = build_args(segment_artifacts, tmp_path / "real" / "db", again, extra=["--mode", "append"])
    assert raee_ops(*append).returncode == 0
    published = ds.dataset(str(tmp_path / "real" / "db" / "_errors" / "sst2")).to_table().column("id").to_pylist()
    assert len(published) == 10  # the killed run's 5 and the append's 5


def test_16_classify_never_removes_another_commands_files(segment_artifacts, db, tmp_path):  # noqa: F811
    shared = tmp_path / "runs"
    train = labelled(tmp_path / "t.parquet", 12, 3, "t")
    assert raee_ops(*build_args(segment_artifacts, tmp_path / "db2", train, extra=["--errors", shared])).returncode == 0
    theirs = sorted(p.name for p in shared.glob("errors-*.parquet"))
    queries = labelled(tmp_path / "q.parquet", 4, 1, "q", bad=False)
    run = raee_ops(*classify_args(segment_artifacts, db, shared, queries))
    assert run.returncode == 2 and "which no run of this command left unfinished there" in one_error_line(run)
    assert sorted(p.name for p in shared.glob("errors-*.parquet")) == theirs  # build-db's rejected rows stay


def test_classify_refuses_a_folder_whose_readers_would_take_other_files_with_its_predictions(
    segment_artifacts,  # noqa: F811
    db,
    tmp_path,
):
    """A user's Parquet file (or a folder of them, or any file a reader takes) in --output: classify published beside
    it, exit 0, and `pq.read_table(out)` read the user's rows with the predictions under the first file's schema,
    the prediction columns gone (sweep B, session 65). Refused before any work, nothing removed; names a reader
    skips (`_`, `.`) and empty folders are left alone and the run completes."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    mine = labelled(out / "part-0.parquet", 3, 5, "m", bad=False)
    shutil.copy(mine, out / "sub" / "x.parquet")
    queries = labelled(tmp_path / "q.parquet", 4, 1, "q", bad=False)
    run = raee_ops(*classify_args(segment_artifacts, db, out, queries))
    assert run.returncode == 2 and "holds part-0.parquet, sub, which no run" in one_error_line(run)
    assert sorted(p.name for p in out.iterdir()) == ["part-0.parquet", "sub"]
    mine.rename(out / "_mine.parquet")
    (out / "sub").rename(out / ".sub")
    (out / "lost+found" / "empty").mkdir(parents=True)  # a volume's, at its root: no reader takes it (recheck)
    assert raee_ops(*classify_args(segment_artifacts, db, out, queries)).returncode == 0
    assert pq.read_table(out).num_rows == 4 and "prediction" in pq.read_table(out).column_names


@pytest.mark.parametrize(
    ("mode", "status", "stderr"), [("interrupt", 130, "error: interrupted\n"), ("terminate", -signal.SIGTERM, "")]
)
def test_17_a_signal_in_the_pipeline_is_that_signal_not_a_workers_failure(
    segment_artifacts,  # noqa: F811
    db,
    tmp_path,
    mode,
    status,
    stderr,
):
    """A Ctrl-C (130) or a scheduler's SIGTERM (its status) that lands in a transform the local runner runs in the
    driver's thread, which wraps what the handler raises in a worker's failure: a SIGTERM ended as that failure,
    exit 1 and an error line."""
    queries = labelled(tmp_path / "q.parquet", 40, 1, "q", bad=False)
    args = classify_args(segment_artifacts, db, tmp_path / "out", queries)
    run = raee_ops(*args, fault="batch:classify", mode=mode)  # in the pipeline, as a user's Ctrl-C lands
    assert (run.returncode, run.stderr) == (status, stderr)
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    assert raee_ops(*args).returncode == 0


@pytest.mark.parametrize(
    ("command", "signalled", "status"),
    [("classify", "interrupt", 130), ("build-db", "interrupt", 130), ("classify", "terminate", -signal.SIGTERM)],
)
def test_a_signal_a_library_swallowed_still_stops_the_run_before_it_writes(
    segment_artifacts,  # noqa: F811
    db,
    tmp_path,
    command,
    signalled,
    status,
):
    """The KeyboardInterrupt of a Ctrl-C landed where a library could not pass it on (LanceDB's client, opening the
    table, printed "Exception ignored" and went on): the run went on to publish, exit 0. It is remembered: the run
    stops before it publishes or commits, as an interrupted run (130), and a rerun completes. A SIGTERM's, in the
    job (elsewhere a SIGTERM ends the process at once), likewise ends the run as a SIGTERM does."""
    rows = labelled(tmp_path / "rows.parquet", 40, 1, "q", bad=False)
    if command == "classify":
        args, point, written = classify_args(segment_artifacts, db, tmp_path / "out", rows), "batch:classify", None
    else:
        args, point = build_args(segment_artifacts, tmp_path / "db", rows), "fit"
        written = tmp_path / "db" / "sst2.lance"
    run = raee_ops(*args, fault=point, mode=f"swallowed-{signalled}")
    assert (run.returncode, run.stderr) == (status, "error: interrupted\n" if status == 130 else "")
    assert not (tmp_path / "out" / "_SUCCESS").exists() and not (written and written.exists())
    assert raee_ops(*args).returncode == 0


def test_workers_read_the_table_version_the_driver_checked(segment_artifacts, tmp_path):  # noqa: F811
    from raee_ops.retrieval import Retriever

    db = str(tmp_path / "db")
    first = labelled(tmp_path / "a.parquet", 6, 3, "a", bad=False)
    checked = run_build_db(segment_artifacts, "sst2", [str(first)], db, "sst2", "backbone", "overwrite", None)
    more = labelled(tmp_path / "b.parquet", 9, 4, "b", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(more)], db, "sst2", "backbone", "overwrite", None)
    assert Retriever(db, "sst2").rows == 9  # a build-db committed after the driver's check ...
    assert Retriever(db, "sst2", checked.version).rows == 6  # ... is not what the run's workers read


def test_a_store_failing_under_a_worker_is_retry_later_never_rejected_rows(
    segment_artifacts,  # noqa: F811
    db,
    tmp_path,
    monkeypatch,
    capsys,
):
    """The table's first read in a worker failing a few times (an S3 503 outlasting the client's retries), then
    working again: the batch failed, its rows were retried one by one, the first ones met the outage and became
    rejections ("damaged files"), and the run ended balanced with exit 0. A raee-ops error is never a row's."""
    from raee_ops import retrieval

    queries = labelled(tmp_path / "q.parquet", 12, 1, "q", bad=False)
    out = tmp_path / "out"
    args = classify_args(str(segment_artifacts), str(db), str(out), str(queries), extra=["--strategy", "raee"])
    real_read, failures = retrieval.InMemory.read.__func__, iter(range(3))

    def hiccup(cls, table, columns):
        if next(failures, None) is not None:
            raise OSError("LanceError(IO): Generic S3 error: request failed, status: 503 Slow Down")
        return real_read(cls, table, columns)

    monkeypatch.setattr(retrieval.InMemory, "read", classmethod(hiccup))
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        main(args)
    line = one_error_line(SimpleNamespace(stderr=capsys.readouterr().err))
    assert ended.value.code == 75 and "could not be read" in line and "retry later" in line, line
    assert not (out / "_SUCCESS").exists()
    monkeypatch.undo()
    main(args)
    assert read_folder(out, "predictions").num_rows == 12
    assert not read_folder(out, "_errors").num_rows


def test_build_db_default_key_needs_the_exported_embedder(tiny_llama_artifacts, tmp_path):
    """The default key is MiniLM's first layers; artifacts exported without it are refused up front with the ways
    out."""
    train = labelled(tmp_path / "train.parquet", 6, 0, "t", bad=False)
    run = raee_ops(*build_args(tiny_llama_artifacts, tmp_path / "db", train))
    line = one_error_line(run)
    assert (
        run.returncode == 2 and f"embedder {DEFAULT_KEY!r} was not exported" in line and "--embedder backbone" in line
    )
    assert not (tmp_path / "db").exists()


def test_run_ids_differ_within_one_process_and_second():
    """Claims, staging folders and error shards are named by run id: two in one second must not collide."""
    ids = [new_run_id() for _ in range(3)]
    assert len(set(ids)) == 3 and ids == sorted(ids)


def test_a_write_that_fails_leaves_no_partial_file_behind(tmp_path):
    """Reports and markers are written aside and renamed into place: one that fails (a full disk, a folder in the
    way) must not leave its partial copy, which every retry of a scheduled job would add to the full disk."""
    (tmp_path / "report.json").mkdir()
    (tmp_path / "report.json" / "keep").write_text("x")
    with pytest.raises(OSError):
        storage.write_bytes(str(tmp_path / "report.json"), b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_leftovers_the_run_cannot_remove_are_named_whole(segment_artifacts, db, tmp_path):  # noqa: F811
    """A killed run's staging in --output that this run may not remove (another user's run's): the line named the
    file alone (`Permission denied: <uuid>-predictions.parquet`), neither where it lies nor whose it is (sweep,
    session 71). It names the whole path and what to do; exit 2, nothing else touched."""
    out = tmp_path / "out"
    staged = out / "_temporary" / "20261207T110000-vm-1-000000"
    staged.mkdir(parents=True)
    (staged / "b11d219e-predictions.parquet").write_bytes(b"x")
    staged.chmod(0o555)
    queries = labelled(tmp_path / "q.parquet", 6, 0, "q", bad=False)
    run = raee_ops(*classify_args(segment_artifacts, db, out, queries), under=bound_by_permissions(), timeout=120)
    assert run.returncode == 2, run.stderr
    assert one_error_line(run) == (
        f"error: cannot remove what an earlier, unfinished run left in {out}: Permission denied: "
        f"{staged / 'b11d219e-predictions.parquet'} (remove it as its owner, then run again)"
    )
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == [
        Path("_temporary"),
        staged.relative_to(out),
        staged.relative_to(out) / "b11d219e-predictions.parquet",
    ]
    staged.chmod(0o755)


def test_partial_copies_killed_writers_left_are_removed_by_the_next_write_a_live_ones_are_not(tmp_path):
    """A writer killed outright (SIGKILL) cannot remove its partial copy: the next write of that file removes the
    copies of writers on this host that are gone, so a killed job's retries do not pile them up on the disk."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    seen = f"{socket.gethostname()}-{os.stat('/proc/self/ns/pid').st_ino}"
    left = tmp_path / f".report.json.partial-{seen}-{gone.stdout.strip()}"
    live = tmp_path / f".report.json.partial-{seen}-{os.getppid()}"
    other_host = tmp_path / f".report.json.partial-elsewhere-{gone.stdout.strip()}"
    other_namespace = tmp_path / f".report.json.partial-{seen}0-{gone.stdout.strip()}"  # a container's: ids apart
    for path in (left, live, other_host, other_namespace):
        path.write_text("{")
    storage.write_bytes(str(tmp_path / "report.json"), b"{}")
    kept = [live.name, other_host.name, other_namespace.name, "report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_two_runs_removing_one_leftover_folder_at_once_both_succeed(tmp_path):
    """Two runs may remove what one killed run left at the same moment (an export's swapped-out folder, reclaimed
    by the next export while its own run removes it): Beam's delete failed on the files the other removed first,
    ending a run whose work was done with an error (10 times in 10)."""
    for i in range(40):
        (tmp_path / "left" / f"d{i}").mkdir(parents=True)
        for j in range(50):
            (tmp_path / "left" / f"d{i}" / f"f{j}").write_text("x")
    remove = f"from raee_ops import storage; storage.delete([{str(tmp_path / 'left')!r}])"
    both = [subprocess.Popen([sys.executable, "-c", remove], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in both:
        assert run.wait(timeout=120) == 0, run.stderr.read()
    assert not (tmp_path / "left").exists()


def test_a_killed_runs_scratch_folder_is_removed_by_the_next_run_a_live_ones_is_not(tmp_path, monkeypatch):
    """Export stages a model's worth of segments on the local temporary disk: a run killed with SIGKILL leaves its
    folder, which the next run removes; a live run's, beside it, stays until that run ends."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    hold_one = "from raee_ops.commit import scratch_folder\nimport sys, time\n"
    hold_one += "with scratch_folder('test-scratch') as s:\n    open(s + '/seg', 'w').write('x'); print(s, flush=True)"
    hold_one += "; time.sleep(60)"
    killed = subprocess.Popen([sys.executable, "-c", hold_one], env=env, stdout=subprocess.PIPE, text=True)
    left = Path(killed.stdout.readline().strip())
    killed.kill()
    killed.wait()
    assert (left / "seg").exists()  # a SIGKILL runs no clean-up
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with scratch_folder("test-scratch") as live:
        assert not left.exists() and Path(live).parent == left.parent == tmp_path
        Path(live, "seg").write_text("mine")
        with scratch_folder("test-scratch") as concurrent:
            assert Path(live, "seg").read_text() == "mine" and concurrent != live
    assert not Path(live).exists() and not Path(concurrent).exists()


def test_workers_refuse_artifacts_an_export_replaced_after_the_runs_checks(segment_artifacts, tmp_path):  # noqa: F811
    """A worker loads the artifacts after the launching process checked them against the table: an export that
    replaced them in between must fail the run, not answer (or build a table) with another model."""
    checked = load_manifest(segment_artifacts)
    replaced = make_artifacts(tmp_path / "replaced", seed=1)
    with pytest.raises(ArtifactsChanged, match="changed during the run"):
        LayerRows(str(replaced), PRESETS["sst2"], "backbone", checked=checked).load()
    assert LayerRows(str(segment_artifacts), PRESETS["sst2"], "backbone", checked=checked).load()
    publishing = tmp_path / "publishing"  # an export on its way in: the old manifest gone, the new one not yet there
    shutil.copytree(segment_artifacts, publishing)
    (publishing / "manifest.json").unlink()
    with pytest.raises(ArtifactsChanged, match="lost their manifest during the run"):  # was exit 1 (evaluate 2)
        LayerRows(str(publishing), PRESETS["sst2"], "backbone", checked=checked).load()
    with pytest.raises(RaeeConfigError, match="no manifest.json") as unchecked:  # no run checked one: a wrong folder
        LayerRows(str(publishing), PRESETS["sst2"], "backbone").load()
    assert not isinstance(unchecked.value, ArtifactsChanged)


def test_a_link_switched_while_the_driver_hashes_the_export_is_a_retry(segment_artifacts, tmp_path, monkeypatch):  # noqa: F811
    """The launching process hashes every file through the link the user named; switched meanwhile to another
    export, a file failed its check (exit 2, "checksum mismatch", as for a damaged export) where a rerun reads the
    new export: now exit 75. A file damaged with the manifest unchanged is still damage."""
    live, other = tmp_path / "live", make_artifacts(tmp_path / "other", seed=1)
    live.symlink_to(segment_artifacts)
    checking = manifest_module.check_file

    def switched_after_the_first(target, expected):
        checking(target, expected)
        if live.resolve() != other:
            live.unlink()
            live.symlink_to(other)

    monkeypatch.setattr(manifest_module, "check_file", switched_after_the_first)
    with pytest.raises(ArtifactsChanged, match="replaced while this run read them .checksum mismatch"):
        load_manifest(live)
    monkeypatch.undo()
    damaged = tmp_path / "damaged"
    shutil.copytree(segment_artifacts, damaged)
    head = next(damaged.glob("head_*.onnx"))
    data = head.read_bytes()
    head.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(RaeeConfigError, match="checksum mismatch") as refused:
        load_manifest(damaged)
    assert not isinstance(refused.value, ArtifactsChanged)


def test_an_export_switched_in_while_workers_load_is_a_retry(segment_artifacts, db, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A blue/green link switched to another export after classify's checks, before its worker loads: the run ends
    with exit 75 (a scheduler retries it: nothing is wrong with either export), publishes nothing, and its rerun
    reads the export in place by then. It was exit 1 from classify and build-db and 2 from evaluate, while each
    line said to run again."""
    link, other = tmp_path / "live", make_artifacts(tmp_path / "other", seed=1)
    link.symlink_to(segment_artifacts)
    loader = Classify.load

    def switched_first(self):
        link.unlink()
        link.symlink_to(other)
        return loader(self)

    monkeypatch.setattr(Classify, "load", switched_first)
    queries = labelled(tmp_path / "q.parquet", 4, 5, "q", bad=False)
    args = classify_args(str(link), str(db), str(tmp_path / "out"), str(queries))
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        main(args)
    line = one_error_line(SimpleNamespace(stderr=capsys.readouterr().err))
    assert ended.value.code == 75 and "changed during the run" in line and "run again" in line, line
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    monkeypatch.undo()
    link.unlink()
    link.symlink_to(segment_artifacts)  # the export the table was built from, in place again
    main(args)
    assert (tmp_path / "out" / "_SUCCESS").is_file()


def _republish(source: Path, folder: Path) -> None:
    """Export `source` again into `folder` as an export does: each file written aside, then renamed over its old one,
    the manifest last."""
    names = sorted(p.name for p in source.iterdir() if p.is_file() and p.name != "manifest.json")
    for name in [*names, "manifest.json"]:
        shutil.copyfile(source / name, folder / f".{name}.new")
        os.replace(folder / f".{name}.new", folder / name)


@pytest.mark.parametrize("switch", ["link", "in place"])
def test_an_export_switched_after_a_worker_read_its_manifest(segment_artifacts, db, tmp_path, monkeypatch, switch):  # noqa: F811
    """Another export switched in after a worker read the manifest, before it loaded the files it loads late (a head,
    the key embedder): a checksum mismatch then ended classify with exit 1 (build-db too, and evaluate 2), read as
    damage. A link is now resolved once, so the worker reads the export it checked to the end (exit 0); an export
    republished into the same folder is a retry (75), and nothing is published."""
    live, other = tmp_path / "live", make_artifacts(tmp_path / "other", seed=1)
    if switch == "link":
        live.symlink_to(segment_artifacts)
    else:
        shutil.copytree(segment_artifacts, live)
    built = SegmentRuntime.__init__

    def switched_after(self, *args, **kwargs):
        built(self, *args, **kwargs)
        if switch == "link":
            live.unlink()
            live.symlink_to(other)
        else:
            _republish(other, live)

    monkeypatch.setattr(SegmentRuntime, "__init__", switched_after)
    queries = labelled(tmp_path / "q.parquet", 4, 5, "q", bad=False)
    # the paper's rule runs layers and reads the zero-shot head, which loads late
    args = classify_args(str(live), str(db), str(tmp_path / "out"), str(queries), extra=("--strategy", "raee"))
    if switch == "link":
        main(args)
        assert (tmp_path / "out" / "_SUCCESS").is_file()
        return
    with pytest.raises(SystemExit) as ended:
        main(args)
    assert ended.value.code == 75 and not (tmp_path / "out" / "_SUCCESS").exists()


def test_build_db_refuses_a_manifest_edited_after_export(segment_artifacts, tmp_path):  # noqa: F811
    """Label names swapped by hand were taken, exit 0: the table's answers then carried each other's names, and
    nothing the checksums cover had changed. Refused with one line before anything is made."""
    edited = tmp_path / "artifacts"
    shutil.copytree(segment_artifacts, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["tasks"]["sst2"]["label_names"].reverse()
    (edited / "manifest.json").write_text(json.dumps(manifest, indent=2))
    train = labelled(tmp_path / "train.parquet", 8, 0, "t", bad=False)
    run = raee_ops(*build_args(edited, tmp_path / "db", train))
    assert run.returncode == 2, run.stderr
    assert "manifest.json was changed after export-onnx wrote it" in one_error_line(run)
    assert not (tmp_path / "db").exists()


def test_a_table_keyed_by_an_embedder_exported_otherwise_is_refused(segment_artifacts, tmp_path, monkeypatch):  # noqa: F811
    """The same backbone and task with the key embedder exported otherwise (here its max_length): the table's keys
    were made by the other one, and classify's would find other neighbours. Accepted before, exit 0 with answers
    that differed (sweep K: 18 of 90), and an append mixed the two kinds of keys in one table. A table built
    before the key's identity was recorded is checked without it, as before."""
    train = labelled(tmp_path / "train.parquet", 30, 0, "t", bad=False)
    db = str(tmp_path / "db")
    run_build_db(segment_artifacts, "sst2", [str(train)], db, "sst2", DEFAULT_KEY, "overwrite", None)
    other = reexported(
        segment_artifacts, tmp_path / "artifacts", lambda m: m["embedders"][DEFAULT_KEY].update(max_length=4)
    )
    queries = labelled(tmp_path / "q.parquet", 3, 1, "q", bad=False)
    run = raee_ops(*classify_args(other, db, tmp_path / "out", queries))
    assert run.returncode == 2 and "key_fingerprint" in one_error_line(run), run.stderr
    assert "the key embedder was exported otherwise" in one_error_line(run) and not (tmp_path / "out").exists()
    more = labelled(tmp_path / "more.parquet", 4, 2, "m", bad=False)
    run = raee_ops(*build_args(other, db, more, extra=["--embedder", DEFAULT_KEY, "--mode", "append"]))
    assert run.returncode == 2 and "key_fingerprint" in one_error_line(run), run.stderr

    encode = TableMeta.encode  # as an earlier release encodes it: no key identity
    monkeypatch.setattr(TableMeta, "encode", lambda meta: {TABLE_META_KEY: encode(meta)[TABLE_META_KEY]})
    run_build_db(segment_artifacts, "sst2", [str(train)], str(tmp_path / "old"), "sst2", DEFAULT_KEY, "overwrite", None)
    monkeypatch.undo()
    summary = run_classify(other, "sst2", str(tmp_path / "old"), "sst2", [str(queries)], str(tmp_path / "o"), 10, None)
    assert summary.rows_in == summary.predicted == 3


def test_a_table_keyed_by_an_embedder_the_export_lacks_is_refused_alike(segment_artifacts, tmp_path, monkeypatch):  # noqa: F811
    """classify refused it with one line; evaluate, on a table from before keys' identities were recorded, ran its
    rows into the missing embedder (every row failed: exit 1). Both open a table through one check now."""
    encode = TableMeta.encode  # as an earlier release encodes it: no key identity
    monkeypatch.setattr(TableMeta, "encode", lambda meta: {TABLE_META_KEY: encode(meta)[TABLE_META_KEY]})
    train = labelled(tmp_path / "train.parquet", 30, 0, "t", bad=False)
    db = str(tmp_path / "db")
    run_build_db(segment_artifacts, "sst2", [str(train)], db, "sst2", DEFAULT_KEY, "overwrite", None)
    monkeypatch.undo()
    without = reexported(segment_artifacts, tmp_path / "artifacts", lambda m: m["embedders"].clear())
    queries = labelled(tmp_path / "q.parquet", 3, 1, "q", bad=False)
    line = re.escape(f"table 'sst2' was keyed with embedder {DEFAULT_KEY!r}, not in {without}")
    with pytest.raises(RaeeConfigError, match=line):
        run_classify(without, "sst2", db, "sst2", [str(queries)], str(tmp_path / "out"), 10, None)
    with pytest.raises(RaeeConfigError, match=line):
        evaluate(str(without), "sst2", db, "sst2", [str(queries)], k=5)
    assert not (tmp_path / "out").exists()


def republished_with(artifacts: Path, other: Path, name: str, into: Path) -> Path:
    """A copy of `artifacts` with file `name` taken from `other` and the manifest vouching for it: a valid export
    that differs from `artifacts` in that file only."""
    shutil.copytree(artifacts, into)
    shutil.copy(other / name, into / name)
    digest = hashlib.sha256((into / name).read_bytes()).hexdigest()
    text = (into / "manifest.json").read_text()
    old = next(ref.sha256 for ref in load_manifest(artifacts).file_refs() if ref.file == name)
    (into / "manifest.json").write_text(sealed(json.loads(text.replace(old, digest))))
    return into


@pytest.mark.parametrize(("name", "part"), [("head_sst2.onnx", "task sst2"), (f"embedder_{DEFAULT_KEY}.onnx", "key")])
def test_workers_refuse_an_export_republished_with_another_head_or_key(segment_artifacts, tmp_path, name, part):  # noqa: F811
    """The backbone alone does not make the answers: an export republished mid-run with the same backbone and
    another task head (or key embedder) must fail the run too, naming what changed."""
    checked = load_manifest(segment_artifacts)
    other = make_artifacts(tmp_path / "other", seed=1)
    replaced = republished_with(segment_artifacts, other, name, tmp_path / "replaced")
    assert load_manifest(replaced).fingerprint == checked.fingerprint  # the same backbone
    with pytest.raises(ArtifactsChanged, match=f"changed during the run \\({part}"):
        LayerRows(str(replaced), PRESETS["sst2"], DEFAULT_KEY, checked=checked).load()


def test_workers_refuse_the_same_files_exported_with_another_max_length(segment_artifacts, tmp_path):  # noqa: F811
    """Files, fingerprint and task alike, --max-length not: a run checked against one export's limit had all its rows
    refused (or accepted) by the other's (sweep Y)."""
    checked = load_manifest(segment_artifacts)
    shorter = reexported(segment_artifacts, tmp_path / "shorter", lambda m: m.update(max_length=8))
    assert load_manifest(shorter).fingerprint == checked.fingerprint
    with pytest.raises(ArtifactsChanged, match=f"changed during the run \\(max_length 8, checked {checked.max_length}"):
        LayerRows(str(shorter), PRESETS["sst2"], DEFAULT_KEY, checked=checked).load()


@pytest.mark.parametrize(("args", "code"), [(["info", "--db", "no-such-db"], 2), (["--help"], 0)])
def test_the_process_ends_with_its_code_whatever_its_teardown_would_do(tmp_path, args, code):
    """Native threads still running at the interpreter's teardown (Arrow's, LanceDB's, ONNX Runtime's) aborted
    refused and finished runs alike (SIGABRT, `terminate called without an active exception`) instead of their exit
    code: the process ends before its teardown. Here an exit handler that aborts stands in for them."""
    script = (
        "import atexit, os, sys\n"
        "atexit.register(os.abort)\n"
        f"sys.argv = ['raee-ops', *{args!r}]\n"
        "from raee_ops.cli import entry\n"
        "entry()\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == code, run.stderr
    assert ("error: " in run.stderr) == bool(code) and ("Usage" in run.stdout) == (not code)


def _commit_conflict(root: Path) -> Exception:
    """LanceDB's own error for a commit that another writer's beat: two threads overwrite one table until one loses."""
    data, lost = pa.table({"a": list(range(1000))}), []
    lancedb.connect(str(root)).create_table("t", data)

    def overwrite() -> None:
        db = lancedb.connect(str(root))
        for _ in range(200):
            try:
                db.create_table("t", data, mode="overwrite")
            except Exception as exc:  # the conflict, as LanceDB raises it
                lost.append(exc)
                return

    racers = [threading.Thread(target=overwrite) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert lost, "no commit conflict in 400 racing overwrites"
    return lost[0]


def test_a_writer_outside_raee_ops_committing_first_is_a_retry(segment_artifacts, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Two raee-ops runs never race a commit (the table's claim); a writer outside them can. Its conflict was an
    internal error, exit 1, naming a Rust source file. Here LanceDB's own error (from two racing overwrites) lands
    on an append's exit-table write, after its feature rows were written: exit 75, the table as it was, and the
    rerun commits the rows with the feature version it wrote."""
    conflict = _commit_conflict(tmp_path / "race")
    assert "commit conflict" in str(conflict).lower()
    db = tmp_path / "db"
    common = ["--artifacts", str(segment_artifacts), "--task", "sst2", "--db", str(db)]
    main(["build-db", *common, "--input", str(labelled(tmp_path / "base.parquet", 8, 0, "b", bad=False))])
    append = ["build-db", *common, "--input", str(labelled(tmp_path / "more.parquet", 6, 1, "m", bad=False))]
    capsys.readouterr()
    real_connect = exit_table.connect

    def beaten(db_uri: str, storage_options: dict[str, str] | None = None) -> lancedb.DBConnection:
        connection = real_connect(db_uri, storage_options)
        create_table = connection.create_table

        def create_exit_table(name: str, *args: object, **kwargs: object) -> lancedb.table.Table:
            if name == "sst2":  # the feature rows are written; the exit table's commit loses the race
                raise conflict
            return create_table(name, *args, **kwargs)

        connection.create_table = create_exit_table
        return connection

    monkeypatch.setattr(exit_table, "connect", beaten)
    with pytest.raises(SystemExit) as ended:
        main([*append, "--mode", "append"])
    line = one_error_line(SimpleNamespace(stderr=capsys.readouterr().err))
    assert ended.value.code == 75 and "another writer committed to table 'sst2'" in line and "run again" in line
    assert ".rs:" not in line  # LanceDB's Rust source location is not the user's business
    assert lancedb.connect(str(db)).open_table("sst2").count_rows() == 8
    monkeypatch.undo()
    main([*append, "--mode", "append"])
    table = lancedb.connect(str(db)).open_table("sst2")
    features = lancedb.connect(str(db)).open_table("sst2" + FEATURES_SUFFIX)
    assert table.count_rows() == 14
    assert table.schema.metadata[FEATURES_VERSION_META_KEY] == str(features.version).encode()


def test_a_run_overtaken_keeps_the_other_runs_version(segment_artifacts, tmp_path, monkeypatch, capsys):  # noqa: F811
    """An append stalled past its claim's life on an object store (a paused VM) while another run took the table and
    committed; resumed, it wrote its whole table over that version and exited 0, the other run's rows gone (stall
    sweep F1). The claim's checks cannot close the window: a stall can come after the last one. Here a version lands
    while this run fits (locally, where a lock cannot lapse, only a writer outside the claims can do that: LanceDB's
    own restore here): this run's commit is undone, the other version current again, and it ends 75; the rerun
    appends on top of it."""
    db = tmp_path / "db"
    common = ["--artifacts", str(segment_artifacts), "--task", "sst2", "--db", str(db)]
    main(["build-db", *common, "--input", str(labelled(tmp_path / "base.parquet", 8, 0, "b", bad=False))])
    append = ["build-db", *common, "--mode", "append", "--input"]
    append.append(str(labelled(tmp_path / "more.parquet", 6, 1, "m", bad=False)))
    real_assemble = build_db.assemble

    def another_version_meanwhile(*args: object, **kwargs: object) -> object:
        other = lancedb.connect(str(db)).open_table("sst2")
        other.checkout(1)
        other.restore()  # version 2, as version 1
        return real_assemble(*args, **kwargs)

    monkeypatch.setattr(build_db, "assemble", another_version_meanwhile)
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        main(append)
    line = one_error_line(SimpleNamespace(stderr=capsys.readouterr().err))
    assert ended.value.code == 75, line
    assert "version 2 was committed by another run after this run read version 1 under its claim" in line
    assert "version 2 is current again (as version 4), nothing of this run's is kept; run again" in line
    table = lancedb.connect(str(db)).open_table("sst2")
    assert table.version == 4 and sorted(table.to_arrow()["id"].to_pylist()) == sorted(f"b{i}" for i in range(8))
    monkeypatch.undo()
    main(append)
    assert lancedb.connect(str(db)).open_table("sst2").count_rows() == 14


def test_only_lancedb_commit_conflicts_read_as_conflicts():
    """A retry is the remedy for a lost commit only: an error that merely mentions the words is not one."""
    rust = ", /root/.cargo/registry/src/index/lance-13/src/io/commit/conflict_resolver.rs:1552:30"
    lost = RuntimeError(f"lance error: Retryable commit conflict for version 9: preempted. Please retry.{rust}")
    assert conflict(lost) == "lance error: Retryable commit conflict for version 9: preempted. Please retry."
    assert conflict(RuntimeError("lance error: Too many concurrent writers. Retried 20 times")) is not None
    assert conflict(OSError("/data/commit conflict notes/rows.parquet: No such file or directory")) is None


WRITES = "where this command writes (its outputs, the temporary folders beside them, TMPDIR)"


class Panic(BaseException):
    """As pyo3's PanicException, which LanceDB raises where its Rust code panics: not an Exception."""


@pytest.mark.parametrize(
    ("raised", "line"),
    [
        (
            OSError(28, os.strerror(28), "/d/.tmp-1/layer_3.onnx"),
            "No space left on device: /d/.tmp-1/layer_3.onnx: free",
        ),
        (OSError(28, os.strerror(28)), f"No space left on device: {WRITES}: free"),  # torch's save names no file
        # LanceDB's, committing a table to a full disk: was "internal error: RuntimeError: lance error: ..." with the
        # Rust source's path (resource-limits sweep)
        (
            RuntimeError("lance error: IO: No space left on device (os error 28), /x/a.rs:1:9"),
            "No space left on device",
        ),
        # out of file descriptors: was "internal error", or a Python traceback where LanceDB panicked
        (
            OSError(24, os.strerror(24), "/o/_temporary"),
            "Too many open files: /o/_temporary: raise the open-file limit",
        ),
        (Panic("Failed to build tokio runtime: Too many open files"), "Too many open files: raise the open-file limit"),
        (Panic("index out of bounds"), "internal error: Panic: index out of bounds (run with -v for the traceback)"),
        # out of memory (importing scipy under ulimit -v, say): was "internal error: MemoryError: "
        (MemoryError(), "MemoryError: give the command and its workers more memory"),
        (
            ImportError("/v/_lancedb.abi3.so: failed to map segment from shared object"),
            "failed to map segment from shared object: give the command and its workers more memory",
        ),
    ],
)
def test_a_resource_run_out_is_one_line_saying_where_not_an_internal_error(monkeypatch, capsys, raised, line):
    """An export filling its disk ended `internal error: OSError: [Errno 28] No space left on device`, as for a bug
    (sweep Y). What fills a disk is the command's own writing; here the command raises it as it would. A worker's
    full disk is the job's failure (exit 1) with the same remedy; so are too many open files."""
    import raee_ops.cli

    def fills_the_disk(*args, **kwargs):
        raise raised

    monkeypatch.setattr(raee_ops.cli.cli, "main", fills_the_disk)
    with pytest.raises(SystemExit) as ended:
        main(["info", "--db", "unused"])
    assert ended.value.code == 1
    said = capsys.readouterr().err.strip()
    assert said.startswith(f"error: {line}") and "\n" not in said, said
    assert said.endswith(", then run again") or said.startswith("error: internal error")
    worker = RuntimeError("OSError: [Errno 28] No space left on device [while running 'WritePredictions/Write']")
    assert options.failure("classify", worker).endswith(
        "] No space left on device [while running 'WritePredictions/Write']; free space there, then run again"
    )
    oom = RuntimeError("RuntimeException: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc")
    assert options.failure("classify", oom).endswith("; give the command and its workers more memory, then run again")
    walk = RuntimeError("Unable to walk dir: IO error for operation on /db: Too many open files (os error 24)")
    told = retrieval.unreachable("/db", walk)  # was "cannot reach the database ... (check --db ...)", exit 2
    assert told.exit_code == 1 and str(told) == (
        "Too many open files opening the database at /db: raise the open-file limit (ulimit -n), then run again"
    )


def test_an_input_with_a_column_classify_adds_is_refused_naming_the_file(segment_artifacts, db, tmp_path):  # noqa: F811
    """The one input refusal that named no file (sweep X); nothing is written."""
    rows = pq.read_table(labelled(tmp_path / "in.parquet", 4, 1, "q", bad=False))
    pq.write_table(rows.append_column("exit_layer", pa.array([1, 2, 3, 4])), tmp_path / "in.parquet")
    run = raee_ops(*classify_args(segment_artifacts, db, tmp_path / "out", tmp_path / "in.parquet"))
    assert run.returncode == 2
    assert one_error_line(run) == (
        f"error: {tmp_path / 'in.parquet'}: has column(s) exit_layer, which classify adds: rename or drop them"
    )
    assert not (tmp_path / "out").exists()
