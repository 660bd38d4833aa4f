"""Fault injection: every command killed (SIGKILL, through the RAEE_FAULT hook) at each named point, then run
again. After the kill, outputs and tables are the old ones or the new ones, never torn; after the rerun, 0 rows
are lost, 0 duplicated, and nothing temporary is left. The summary is printed at the end of the test run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lancedb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from cli_runs import raee_ops, read_folder
from conftest import FaultRecord
from raee_ops.pipelines.build_db import run_build_db
from raee_ops.schemas.manifest import load_manifest
from segment_artifacts import segment_artifacts  # noqa: F401 - fixture
from test_failures import build_args, classify_args
from test_pipelines import BAD_IDS, labelled

KILLED = -9
ROWS = 200  # enough for several batches (and the @2 points)


def all_ids(path: Path) -> set[str]:
    return set(pq.read_table(path, columns=["id"]).column("id").to_pylist())


def table_ids(db: Path, table: str) -> list[str]:
    return lancedb.connect(str(db)).open_table(table).to_arrow().column("id").to_pylist()


@pytest.fixture(scope="module")
def reference(segment_artifacts, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("faults")
    train = labelled(root / "train.parquet", 30, 0, "t", bad=False)
    assert raee_ops(*build_args(segment_artifacts, root / "db", train)).returncode == 0
    return root / "db"


@pytest.mark.parametrize("point", ["batch:classify@2", "publish:predictions-*.parquet", "publish:_errors-*.parquet"])
def test_classify_killed_then_rerun(point, segment_artifacts, reference, tmp_path, fault_records):  # noqa: F811
    queries = labelled(tmp_path / "q.parquet", ROWS, 9, "q")
    out = tmp_path / "out"
    args = classify_args(segment_artifacts, reference, out, queries)
    killed = raee_ops(*args, fault=point)
    assert killed.returncode == KILLED, killed.stderr
    assert not (out / "_SUCCESS").exists()  # whatever it published, the folder does not look complete
    rerun = raee_ops(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "removed what an earlier, unfinished run left" in rerun.stderr
    predicted, rejected = read_folder(out, "predictions"), read_folder(out, "_errors")
    ids = predicted.column("id").to_pylist() + rejected.column("id").to_pylist()
    lost, duplicated = len(all_ids(queries) - set(ids)), len(ids) - len(set(ids))
    assert (lost, duplicated) == (0, 0) and len(ids) == ROWS + len(BAD_IDS)
    names = {p.name for p in out.iterdir()}
    assert names == {"_SUCCESS"} | {p.name for p in out.glob("predictions-*.parquet")} | {
        p.name for p in out.glob("_errors-*.parquet")
    }
    assert ds.dataset(sorted(map(str, out.glob("predictions-*.parquet")))).count_rows() == predicted.num_rows
    fault_records.append(FaultRecord("classify", point, 1, lost, duplicated))


def test_classify_killed_just_after_its_success_marker_is_done_and_tidied(segment_artifacts, reference, tmp_path):  # noqa: F811
    """Killed between writing `_SUCCESS` and removing its publishing list: complete, so a rerun is done; the list and
    the staging folder it left beside the marker were never removed."""
    queries = labelled(tmp_path / "q.parquet", ROWS, 9, "q")
    out = tmp_path / "out"
    args = classify_args(segment_artifacts, reference, out, queries)
    assert raee_ops(*args, fault="publish:_SUCCESS").returncode == KILLED
    assert {"_SUCCESS", "_PUBLISHING", "_temporary"} <= {p.name for p in out.iterdir()}
    rerun = raee_ops(*args)
    assert rerun.returncode == 0 and "already done" in rerun.stdout, rerun.stderr
    assert not {"_PUBLISHING", "_temporary"} & {p.name for p in out.iterdir()}
    ids = (
        read_folder(out, "predictions").column("id").to_pylist() + read_folder(out, "_errors").column("id").to_pylist()
    )
    assert sorted(ids) == sorted(set(ids)) and len(ids) == ROWS + len(BAD_IDS)


def test_classify_killed_while_removing_a_killed_runs_leftovers(segment_artifacts, reference, tmp_path):  # noqa: F811
    """The list of what a killed run published goes last: removed first, it left the files it named looking like
    another command's, and the folder was refused for good."""
    queries = labelled(tmp_path / "q.parquet", ROWS, 9, "q")
    out = tmp_path / "out"
    args = classify_args(segment_artifacts, reference, out, queries)
    assert raee_ops(*args, fault="publish:_errors-*.parquet").returncode == KILLED
    assert raee_ops(*args, fault="leftovers").returncode == KILLED
    assert (out / "_PUBLISHING").exists()
    rerun = raee_ops(*args)
    assert rerun.returncode == 0, rerun.stderr
    ids = (
        read_folder(out, "predictions").column("id").to_pylist() + read_folder(out, "_errors").column("id").to_pylist()
    )
    assert sorted(ids) == sorted(set(ids)) and len(ids) == ROWS + len(BAD_IDS)


@pytest.mark.parametrize("mode", ["overwrite", "append"])
@pytest.mark.parametrize("point", ["batch:build-db@2", "commit:errors", "commit:table"])
def test_build_db_killed_then_rerun(point, mode, segment_artifacts, tmp_path, fault_records):  # noqa: F811
    db, temp = tmp_path / "db", tmp_path / "system-temp"  # the runs' own system temp folder, to check it after
    temp.mkdir()
    old = labelled(tmp_path / "old.parquet", 30, 0, "t", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(old)], str(db), "sst2", "backbone", "overwrite", None)
    new = labelled(tmp_path / "new.parquet", ROWS, 10, "n")
    args = build_args(segment_artifacts, db, new, extra=["--mode", mode])
    killed = raee_ops(*args, fault=point, tmpdir=temp)
    assert killed.returncode == KILLED, killed.stderr
    valid_new = all_ids(new) - set(BAD_IDS)
    expected_new = valid_new | (all_ids(old) if mode == "append" else set())
    after_kill = table_ids(db, "sst2")
    assert len(after_kill) == len(set(after_kill))  # never duplicated, never torn: old or new
    assert set(after_kill) in (all_ids(old), expected_new)
    rerun = raee_ops(*args, tmpdir=temp)
    assert rerun.returncode == 0, rerun.stderr
    if mode == "append" and set(after_kill) == expected_new:  # the kill came after the commit: a retry is done
        assert "already done: table version" in rerun.stdout
    ids = table_ids(db, "sst2")
    lost, duplicated = len(expected_new - set(ids)), len(ids) - len(set(ids))
    assert (lost, duplicated) == (0, 0) and set(ids) == expected_new
    assert [p.name for p in (db / "_raee-work" / "sst2").iterdir()] == []  # no staging left behind
    errors = ds.dataset(str(db / "_errors" / "sst2")).to_table().column("id").to_pylist()  # as readers see it
    assert sorted(errors) == sorted(BAD_IDS)  # each rejected row once: none lost, none twice
    lost, duplicated = lost + len(set(BAD_IDS) - set(errors)), duplicated + len(errors) - len(set(errors))
    assert not list(temp.glob("raee-*"))  # the old build-db staged (and, killed, left) its rows there
    fault_records.append(FaultRecord(f"build-db {mode}", point, 1, lost, duplicated))


def test_an_all_rejected_append_killed_after_its_commit_is_done_on_retry(segment_artifacts, tmp_path):  # noqa: F811
    db = tmp_path / "db"
    run_build_db(
        segment_artifacts,
        "sst2",
        [str(labelled(tmp_path / "old.parquet", 8, 0, "t", bad=False))],
        str(db),
        "sst2",
        "backbone",
        "overwrite",
        None,
    )
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["x1", "x2"], "text": ["good", "fine"], "label": [7, 9]}), bad)
    args = build_args(segment_artifacts, db, bad, extra=["--mode", "append", "--max-rejected", "1"])
    assert raee_ops(*args, fault="commit:table").returncode == KILLED  # no new ids: a retry finds none present
    rerun = raee_ops(*args)
    assert rerun.returncode == 0 and "already done" in rerun.stdout, rerun.stderr
    errors = ds.dataset(str(db / "_errors" / "sst2")).to_table().column("id").to_pylist()
    assert sorted(errors) == ["x1", "x2"]  # once


def test_a_retried_append_is_held_to_its_own_max_rejected(segment_artifacts, tmp_path):  # noqa: F811
    """A retry that finds its job committed already still answers for the rows that run rejected: over the retry's
    --max-rejected it fails as a run would (exit 4), not 'already done'."""
    db = tmp_path / "db"
    old = labelled(tmp_path / "old.parquet", 30, 0, "t", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(old)], str(db), "sst2", "backbone", "overwrite", None)
    new = labelled(tmp_path / "new.parquet", 8, 3, "n")  # 5 of 13 rows rejected: 38%
    args = build_args(segment_artifacts, db, new, extra=["--mode", "append"])
    assert raee_ops(*args, fault="commit:table").returncode == KILLED
    stricter = raee_ops(*args, "--max-rejected", "0.2")  # its stderr first names the killed run's staging, removed
    line = stricter.stderr.splitlines()[-1]
    assert stricter.returncode == 4 and line.startswith(
        "error: 5 of 13 rows rejected (a share of 0.385), over --max-rejected 0.2"
    )
    assert "version 2 holds this job's rows" in line and len(table_ids(db, "sst2")) == 38  # as it was committed
    retry = raee_ops(*args)
    assert retry.returncode == 0 and "already done: table version 2 holds" in retry.stdout, retry.stderr


@pytest.mark.parametrize(
    ("mode", "point"), [("append", "commit:table"), ("overwrite", "commit:table"), ("overwrite", "commit:errors")]
)
def test_a_rerun_given_another_errors_folder_settles_the_killed_runs(mode, point, segment_artifacts, tmp_path):  # noqa: F811
    """Killed with its rejected rows staged in the default folder, retried with --errors elsewhere: the killed run's
    folder is settled as a retry into it would settle it (a committed run's rows published there, once; any other
    staging removed), and the retry says so."""
    db, elsewhere = tmp_path / "db", tmp_path / "errors"
    old = labelled(tmp_path / "old.parquet", 30, 0, "t", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(old)], str(db), "sst2", "backbone", "overwrite", None)
    new = labelled(tmp_path / "new.parquet", 8, 3, "n")
    args = build_args(segment_artifacts, db, new, extra=["--mode", mode])
    assert raee_ops(*args, fault=point).returncode == KILLED
    rerun = raee_ops(*args, "--errors", elsewhere)
    assert rerun.returncode == 0, rerun.stderr
    default, committed = db / "_errors" / "sst2", point == "commit:table"
    done = mode == "append" and committed
    # the killed run's rows published; set aside where the retry's overwrite replaced its version
    assert sorted(read_folder(default, "errors").column("id").to_pylist()) == sorted(BAD_IDS if done else [])
    aside = read_folder(default / "_replaced", "errors").column("id").to_pylist()
    assert sorted(aside) == sorted(BAD_IDS if committed and not done else [])
    assert not (default / "_staging").exists()  # nothing left staged, nor the emptied folders
    # a folder given with --errors may be shared by tables: only this table's emptied staging goes
    assert not [*(elsewhere / "_staging").glob("*")]
    assert sorted(read_folder(elsewhere, "errors").column("id").to_pylist()) == sorted([] if done else BAD_IDS)
    assert f"settled what an earlier, unfinished run left in its errors folder {default}" in rerun.stderr
    assert [p.name for p in (db / "_raee-work" / "sst2").iterdir()] == []


@pytest.mark.parametrize("point", ["prune:cut", "prune:cut@2"])
def test_prune_killed_then_rerun(point, segment_artifacts, tmp_path, fault_records):  # noqa: F811
    """Killed after removing the table's old versions (or its companion's too): the kept version reads whole, and the
    rerun removes what is left to remove; an append then refits as before."""
    db = tmp_path / "db"
    for n, mode in enumerate(["overwrite", "append", "append"]):
        rows = labelled(tmp_path / f"{n}.parquet", 8, n, f"r{n}-", bad=False)
        run_build_db(segment_artifacts, "sst2", [str(rows)], str(db), "sst2", "backbone", mode, None)
    before = table_ids(db, "sst2")
    prune = ("prune", "--db", db, "--table", "sst2", "--keep", "1", "--grace", "0")
    assert raee_ops(*prune, fault=point).returncode == KILLED
    assert sorted(table_ids(db, "sst2")) == sorted(before)
    rerun = raee_ops(*prune)
    assert rerun.returncode == 0, rerun.stderr
    companion = "no version" if point.endswith("@2") else "versions 1-2"
    assert rerun.stdout.startswith(
        f"table sst2: removed no version; kept version 3\n  sst2__features (probe fit rows): removed {companion}; "
        "kept version 3"
    ), rerun.stdout
    more = labelled(tmp_path / "more.parquet", 8, 5, "m", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(more)], str(db), "sst2", "backbone", "append", None)
    ids = table_ids(db, "sst2")
    lost, duplicated = len(set(before) - set(ids)), len(ids) - len(set(ids))
    assert (lost, duplicated) == (0, 0) and len(ids) == len(before) + 8
    fault_records.append(FaultRecord("prune", point, 1, lost, duplicated))


def test_export_killed_then_rerun(tiny_llama_dir, tmp_path, fault_records):
    out = tmp_path / "artifacts"
    args = ["export-onnx", "--model", tiny_llama_dir, "--task", "sst2", "--out", out, "--no-verify"]
    args += ["--embedder", "none"]  # seven exports: without MiniLM's weights to load, export and optimize each time

    def leftovers() -> list[str]:
        return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".artifacts."))

    killed = raee_ops(*args, fault="export:segment@2")
    assert killed.returncode == KILLED and not out.exists() and leftovers()
    assert raee_ops(*args).returncode == 0 and leftovers() == []
    first = load_manifest(out)
    killed = raee_ops(*args, fault="export:move")
    assert killed.returncode == KILLED and leftovers()
    assert load_manifest(out) == first  # the complete old export is untouched (checksums checked on load)
    rerun = raee_ops(*args)
    assert rerun.returncode == 0 and leftovers() == [], rerun.stderr
    load_manifest(out)
    killed = raee_ops(*args, fault="export:aside")  # the folders swapped in one step: the new export is in place
    assert killed.returncode == KILLED and leftovers()
    assert load_manifest(out).verify == first.verify  # and whole (the old one waits for removal beside it)
    assert raee_ops(*args).returncode == 0 and leftovers() == []
    load_manifest(out)
    for point in ("export:segment@2", "export:move", "export:aside"):
        fault_records.append(FaultRecord("export-onnx", point, 1, 0, 0))


def test_an_input_replaced_by_other_rows_of_its_size_and_time_is_another_job(segment_artifacts, tmp_path):  # noqa: F811
    """Its rows were never added: the append said 'already done', exit 0, for the job of the file it replaced (same
    path, size and modification time: `cp -p`, `rsync -t`, an object store's whole seconds) (sweep, session 66)."""
    db = tmp_path / "db"
    old = labelled(tmp_path / "old.parquet", 30, 0, "t", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(old)], str(db), "sst2", "backbone", "overwrite", None)
    daily, other = tmp_path / "daily.parquet", labelled(tmp_path / "other.parquet", 8, 3, "b", bad=False)
    labelled(daily, 8, 3, "a", bad=False)
    assert daily.stat().st_size == other.stat().st_size  # the same rows under other ids
    args = build_args(segment_artifacts, db, daily, extra=["--mode", "append"])
    assert raee_ops(*args).returncode == 0
    then = daily.stat().st_mtime
    shutil.copy(other, daily)
    os.utime(daily, (then, then))
    run = raee_ops(*args)
    assert run.returncode == 0 and "already done" not in run.stdout, run.stdout
    assert sorted(table_ids(db, "sst2")) == sorted(all_ids(old) | {f"{p}{i}" for p in "ab" for i in range(8)})


def footer(path: Path) -> bytes:
    data = path.read_bytes()
    return data[-8 - int.from_bytes(data[-8:-4], "little") : -8]


def test_an_input_edited_in_place_is_another_job(segment_artifacts, reference, tmp_path):  # noqa: F811
    """One character changed in place can leave a Parquet footer as it was, byte for byte (sizes and min/max
    alike): inputs known by their footers alone, the edited input's classify said 'already done' over the old
    predictions, exit 0 (recheck, session 66). Its content tells it, its time kept too: another job, refused."""
    path = tmp_path / "q.parquet"

    def write(middle: str) -> None:
        texts = ["a good film", middle, "the worst"]
        pq.write_table(pa.table({"id": ["q0", "q1", "q2"], "text": texts}), path, compression="none")

    write("not terrible")
    before, then = footer(path), path.stat().st_mtime
    args = classify_args(segment_artifacts, reference, tmp_path / "out", path)
    assert raee_ops(*args).returncode == 0
    write("not tarrible")
    os.utime(path, (then, then))
    assert footer(path) == before  # what the footer cannot tell, nor the time
    run = raee_ops(*args)
    assert run.returncode == 2 and "already holds a complete output" in run.stderr, run.stderr
    assert f"of another job ({os.path.realpath(path)}: changed since)" in run.stderr  # what differs, named


def test_an_input_copied_again_is_the_same_job(segment_artifacts, reference, tmp_path):  # noqa: F811
    """A scheduler's retry that fetches its input anew (the same bytes, a new modification time) was another job:
    classify was refused 'already holds a complete output', build-db's append 'ids already in table', exit 2 on
    every retry (sweep, session 66). Both are done, exit 0, as the retry of the same file is."""
    source = labelled(tmp_path / "source.parquet", 8, 3, "a", bad=False)
    path = tmp_path / "daily.parquet"
    shutil.copy(source, path)
    args = classify_args(segment_artifacts, reference, tmp_path / "out", path)
    assert raee_ops(*args).returncode == 0
    db = tmp_path / "db"
    old = labelled(tmp_path / "old.parquet", 30, 0, "t", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(old)], str(db), "sst2", "backbone", "overwrite", None)
    append = build_args(segment_artifacts, db, path, extra=["--mode", "append"])
    assert raee_ops(*append).returncode == 0
    later = path.stat().st_mtime + 60
    shutil.copy(source, path)
    os.utime(path, (later, later))
    (tmp_path / "link.parquet").symlink_to(path)  # the same file through a link: the same job (it was another)
    via_link = classify_args(segment_artifacts, reference, tmp_path / "out", tmp_path / "link.parquet")
    for again in (raee_ops(*args), raee_ops(*append), raee_ops(*via_link)):
        assert again.returncode == 0 and "already done" in again.stdout, again.stderr
    assert sorted(table_ids(db, "sst2")) == sorted(all_ids(old) | all_ids(source))
