"""`raee-ops info`, `rollback` and `prune` on tables built by build-db from tiny segment artifacts."""

import json
import os
import subprocess
import time
from datetime import timedelta

import lancedb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runs import bound_by_permissions, one_error_line, raee_ops
from raee_ops.pipelines.build_db import run_build_db
from raee_ops.schemas.manifest import load_manifest
from segment_artifacts import segment_artifacts  # noqa: F401 - fixture
from test_pipelines import labelled
from test_retrieval import _exit_table

from raee_ops import retrieval
from raee_ops.calibration import K_GRID
from raee_ops.commit import hold
from raee_ops.errors import Busy, RaeeConfigError
from raee_ops.exit_table import commit, current_version
from raee_ops.info import describe, render
from raee_ops.probe_policy import SHOWN_BUDGETS, SHOWN_PRICES
from raee_ops.retrieval import Retriever
from raee_ops.run_record import RunRecord, work_dir
from raee_ops.versions import prune, rollback, to_keep


def build_twice(artifacts, root):
    """A table written by an overwrite of 24 rows, then an append of 8: versions 1 and 2."""
    db = str(root / "db")
    first = labelled(root / "first.parquet", 24, 0, "a", bad=False)
    more = labelled(root / "more.parquet", 8, 1, "b", bad=False)
    run_build_db(artifacts, "sst2", [str(first)], db, "sst2", "backbone", "overwrite", None)
    run_build_db(artifacts, "sst2", [str(more)], db, "sst2", "backbone", "append", None)
    return db


@pytest.fixture(scope="module")
def db(segment_artifacts, tmp_path_factory):  # noqa: F811
    db = build_twice(segment_artifacts, tmp_path_factory.mktemp("info"))
    lancedb.connect(db).create_table("notes", pa.table({"x": [1, 2]}))  # a table build-db did not write
    return db


def test_info_shows_identity_size_policy_and_history(db, segment_artifacts):  # noqa: F811
    fingerprint = load_manifest(segment_artifacts).fingerprint
    info = describe(db)
    assert [t["table"] for t in info["tables"]] == ["notes", "sst2"]
    notes, table = info["tables"]
    assert not notes["exit_table"] and notes["task"] is None and notes["rows"] == 2
    assert table["exit_table"] and (table["task"], table["embedder"]) == ("sst2", "backbone")
    assert table["fingerprint"] == fingerprint
    assert table["num_layers"] == 3 and table["label_names"] == ["negative", "positive"]
    assert table["rows"] == 32 and table["indices"] == []
    assert [(v["version"], v["rows"]) for v in table["versions"]] == [(1, 24), (2, 32)]
    assert table["version"] == 2
    policy = table["policy"]
    assert policy["k"] in K_GRID and policy["loo_queries"] == 32 and "bias" not in policy
    assert policy["settings"] == Retriever(db, "sst2").policy.settings()
    retriever = Retriever(db, "sst2")
    probes, probe_policy = retriever.probes, retriever.probe_policy
    assert table["probes"]["view"] == probes.pooling and table["probes"]["form"] == probes.form
    assert table["probes"]["best_layer"] == probes.best_layer and table["probes"]["fit_rows"] == 32
    assert table["probe_policy"]["settings"] == probe_policy.settings()
    by_budget = table["probe_policy"]["by_budget"]
    own_budget, own_price = probe_policy.layer_budget, probe_policy.layer_price
    assert [(b["layer_budget"], b["layer_price"]) for b in by_budget] == [(b, own_price) for b in SHOWN_BUDGETS] + [
        (own_budget, p) for p in SHOWN_PRICES
    ]
    own = next(b for b in by_budget if (b["layer_budget"], b["layer_price"]) == (own_budget, own_price))
    assert (own["metric"], own["mean_exit"]) == (probe_policy.loo_metric, probe_policy.loo_mean_exit)
    assert json.loads(json.dumps(info)) == info  # plain values only

    text = render(info)
    assert "table sst2: 32 rows, version 2" in text
    assert "task: sst2 (negative, positive)" in text and f"artifacts fingerprint: {fingerprint}" in text
    assert "index: none (exact search)" in text and f"fused policy: {policy['settings']}; accuracy " in text
    assert "(leave-one-out, on 32 rows)" in text and policy["validation"] == "leave-one-out, on 32 rows"
    assert f"probe heads: {probes.pooling} view (runs the {probes.form} input), fitted on 32 rows" in text
    assert f"probe policy (the default's): {probe_policy.settings()}; accuracy " in text
    assert f"; the most common label there {probe_policy.floor[0]:.3f}" in text  # the floor the fall-back compares
    estimate = probe_policy.estimate  # the default's choice cross-validated on the reference rows, kept by build-db
    assert estimate is not None and table["probe_policy"]["estimate"] == list(estimate)
    assert "cross-validated on the reference rows (made on 4 of 5 folds of them, scored on the other; 2 " in text
    assert f"accuracy {estimate.metric:.3f}, mean exit layer {estimate.mean_exit:.2f}; probe-best " in text
    counts = probes.label_counts  # every row of the table (the fall-back's answer), not only the probes' fit rows
    assert sum(counts) == 32 and f"the most common label for every reference row {max(counts) / 32:.3f}" in text
    budgets = ", ".join(f"{b['layer_budget']}: {b['metric']:.3f} @ {b['mean_exit']:.1f}" for b in by_budget[:6])
    prices = ", ".join(f"{b['layer_price']}: {b['metric']:.3f} @ {b['mean_exit']:.1f}" for b in by_budget[6:])
    assert f"other layer budgets (classify --layer-budget; accuracy @ mean exit): {budgets}; " in text
    assert f"other layer prices (--layer-price): {prices}" in text
    assert "   1  " in text and "24 rows" in text and "   2  " in text
    assert "table notes: 2 rows" in text and "not an exit table" in text


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return raee_ops(*args, timeout=60)


def test_info_cli_json_one_table_and_unknown_table(db):
    ok = run_cli("info", "--db", db, "--table", "sst2", "--json", "-q")  # -q silenced the asked-for document
    assert ok.returncode == 0, ok.stderr
    assert [t["table"] for t in json.loads(ok.stdout)["tables"]] == ["sst2"]
    missing = run_cli("info", "--db", db, "--table", "nope")
    assert missing.returncode == 2 and missing.stderr == f"error: no table 'nope' in {db} (run build-db first)\n"


def test_info_and_rollback_refuse_a_database_that_is_not_there(tmp_path):
    for call in (lambda: describe(str(tmp_path / "typo")), lambda: rollback(str(tmp_path / "typo"), "sst2", 1)):
        with pytest.raises(RaeeConfigError, match="no LanceDB database at .*typo"):
            call()
    assert not (tmp_path / "typo").exists()  # connecting would have created it


def test_info_of_another_programs_table_says_so_and_counts_its_row(tmp_path):
    db = tmp_path / "db"
    lancedb.connect(str(db)).create_table("t", pa.table({"x": [1]}))
    text = render(describe(str(db)))
    assert text.startswith("table t: 1 row, version 1\n")  # "1 rows"
    assert "not an exit table built by raee-ops build-db" in text and "  1 row\n" in text + "\n"


def test_a_table_with_damaged_files_is_one_line_not_an_internal_error(tmp_path):
    db = tmp_path / "db"
    lancedb.connect(str(tmp_path / "sound-db")).create_table("t", pa.table({"x": [1]}))
    lancedb.connect(str(db)).create_table("t", pa.table({"x": [1, 2]}))
    for manifest in (db / "t.lance" / "_versions").iterdir():
        manifest.write_bytes(b"junk\n")  # a manifest cut short by a full disk, say
    damaged = run_cli("info", "--db", str(db), "--table", "t", "--json")
    assert damaged.returncode == 2 and damaged.stderr == f"error: table(s) t in {db} cannot be read: see above\n"
    line = f"table 't' in {db} cannot be read (damaged or incomplete files?): "
    (shown,) = json.loads(damaged.stdout)["tables"]  # it printed no JSON, only the error line
    assert set(shown) == set(describe(str(tmp_path / "sound-db"))["tables"][0]) and shown["rows"] is None  # its keys
    assert shown["table"] == "t" and shown["unreadable"].startswith(line) and ".rs:" not in shown["unreadable"]
    # no version opens: rollback and build-db fail alike, so the line does not send the operator to them (sweep T)
    assert f"restore its files, or move its folder {db / 't.lance'} away and rebuild it" in shown["unreadable"]
    # among the others (it hid every sound table behind its one line): shown in place, then exit 2
    lancedb.connect(str(db)).create_table("sound", pa.table({"x": [1]}))
    every = run_cli("info", "--db", str(db))
    assert every.returncode == 2 and every.stderr == f"error: table(s) t in {db} cannot be read: see above\n"
    assert (
        every.stdout.startswith("table sound: 1 row, version 1\n") and "UNREADABLE" not in every.stdout.split("\n\n")[0]
    )
    assert every.stdout.split("\n\n")[1].startswith(f"table t: cannot be read\n  UNREADABLE: {line}")
    assert json.loads(run_cli("info", "--db", str(db), "--json").stdout)["tables"][1]["unreadable"].startswith(line)


def test_prune_of_every_table_goes_on_past_a_damaged_one(segment_artifacts, tmp_path):  # noqa: F811
    """One table whose newest manifest is damaged stopped a prune of every table with exit 2 partway: the tables
    sorted before it pruned (their versions gone for rollback) without a word, those after it never. Now every
    sound table is pruned and printed, and the damaged one is named in the error line, exit 2."""
    db = build_twice(segment_artifacts, tmp_path)
    lancedb.connect(db).create_table("a_damaged", pa.table({"x": [1]}))  # sorts first
    for manifest in (tmp_path / "db" / "a_damaged.lance" / "_versions").iterdir():
        manifest.write_bytes(b"junk\n")
    for seed in (0, 1):  # zz: an exit table whose older version's manifest is damaged (LanceDB reads them all)
        data = labelled(tmp_path / f"zz{seed}.parquet", 8, seed, f"z{seed}", bad=False)
        run_build_db(segment_artifacts, "sst2", [str(data)], db, "zz", "backbone", "overwrite", None)
    oldest = min((tmp_path / "db" / "zz.lance" / "_versions").iterdir(), key=lambda f: f.stat().st_mtime_ns)
    oldest.write_bytes(b"junk\n")
    run = run_cli("prune", "--db", db, "--keep", "1", "--grace", "0")
    assert run.returncode == 2, run.stderr
    line = "error: not pruned, the others were: table 'a_damaged' in "
    assert run.stderr.startswith(line) and run.stderr.count("\n") == 1
    assert "; table 'zz' cannot be read (damaged or incomplete files?)" in run.stderr  # was exit 1, internal error
    assert run.stdout.startswith("table sst2: removed version 1"), run.stdout
    assert [v["version"] for v in describe(db, "sst2")["tables"][0]["versions"]] == [2]
    alone = str(tmp_path / "alone")  # its only table damaged: no "others" to speak of
    lancedb.connect(alone).create_table("a_damaged", pa.table({"x": [1]}))
    for manifest in (tmp_path / "alone" / "a_damaged.lance" / "_versions").iterdir():
        manifest.write_bytes(b"junk\n")
    run = run_cli("prune", "--db", alone, "--keep", "1", "--grace", "0")
    assert run.returncode == 2 and run.stderr.startswith("error: not pruned, no other table: table 'a_damaged'")
    shown = run_cli("info", "--db", db)  # each damaged table in place, the sound one whole
    assert (
        shown.returncode == 2 and shown.stderr == f"error: table(s) a_damaged, zz in {db} cannot be read: see above\n"
    )
    assert [block.split(":")[0] for block in shown.stdout.split("\n\n")] == [
        "table a_damaged",
        "table sst2",
        "table zz",
    ]
    # what mends zz: its current version reads whole, so not moving it away (every version lost), as the line said
    zz = shown.stdout.split("\n\n")[2]
    assert "it is version 1's manifest, not the current version 2's (classify and evaluate read that one): " in zz
    assert "or delete it to drop that version from the history" in zz
    assert "delete it to drop" not in shown.stdout.split("\n\n")[0]  # a_damaged: its newest manifest
    oldest.unlink()
    assert [v["version"] for v in describe(db, "zz")["tables"][0]["versions"]] == [2]


def test_a_table_whose_feature_rows_are_damaged_or_gone_says_append_is_refused_and_exit_2(segment_artifacts, tmp_path):  # noqa: F811
    """The probes' feature rows (the companion an append refits on) damaged: info showed the table sound, exit 0,
    and the next scheduled append failed. Now info says append is refused and why, with exit 2; the table's rows
    are sound, so classify is not refused."""
    db = build_twice(segment_artifacts, tmp_path)
    assert describe(db)["tables"][0]["features_unreadable"] is None
    newest = max((tmp_path / "db" / "sst2__features.lance" / "data").iterdir(), key=lambda f: f.stat().st_mtime_ns)
    newest.write_bytes(b"junk")
    run = run_cli("info", "--db", db)
    assert run.returncode == 2 and run.stderr == f"error: table(s) sst2 in {db} cannot be appended to: see above\n"
    assert "UNREADABLE" not in run.stdout
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("  NO APPEND")]
    assert (
        line.startswith("  NO APPEND (classify is unaffected): append refused: table 'sst2__features' in ")
        and "cannot be read" in line
    )  # what mends it: the companion's own name in build-db is refused
    assert line.endswith(
        f"move its folder {db}/sst2__features.lance away and rebuild table 'sst2' (build-db --mode overwrite)"
    )
    more = labelled(tmp_path / "more.parquet", 4, 7, "more", bad=False)
    with pytest.raises(RaeeConfigError, match="table 'sst2__features' in .* cannot be read"):  # what info foretold
        run_build_db(segment_artifacts, "sst2", [str(more)], db, "sst2", "backbone", "append", None)
    lancedb.connect(db).drop_table("sst2__features")
    (shown,) = describe(db, "sst2")["tables"]
    assert (
        shown["unreadable"] is None
        and "the old rows' features the probes are refitted on, is missing" in (shown["features_unreadable"])
    )


def test_feature_rows_an_append_cannot_refit_on_are_refused_and_old_damage_is_not(segment_artifacts, tmp_path):  # noqa: F811
    """The companion checked as the refit reads it: one without its features column, or lacking some fit rows, was
    passed by info (exit 0) and failed the append after its work (exit 1, KeyError; exit 2). A damaged manifest of
    an older companion version, which an append never reads, refused it, and info showed NO APPEND (recheck 64)."""
    db = build_twice(segment_artifacts, tmp_path)
    table = lancedb.connect(db).open_table("sst2")
    ids = table.to_arrow()["id"]
    oldest = min(
        (tmp_path / "db" / "sst2__features.lance" / "_versions").glob("*.manifest"), key=lambda f: f.stat().st_mtime_ns
    )
    oldest.write_bytes(b"junk\n")  # version 1; the table's version 2 pins version 2
    assert describe(db)["tables"][0]["features_unreadable"] is None
    features = retrieval.checked_features(db, "sst2", table.schema, ids, None).to_arrow()
    more = labelled(tmp_path / "more.parquet", 4, 7, "more", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(more)], db, "sst2", "backbone", "append", None)
    unpinned = table.schema.remove_metadata()  # the companion's latest is read: rewritten below
    for broken, said in (
        (features.select(["id"]), "has no 'features' column"),
        (features.slice(3), "lacks 3 of the table's probe fit rows"),
    ):
        lancedb.connect(db).create_table("sst2__features", broken, mode="overwrite")
        with pytest.raises(RaeeConfigError, match=f"append refused: table 'sst2__features' in .*{said}; rebuild"):
            retrieval.checked_features(db, "sst2", unpinned, ids, None)
    for version in (1, 2):  # removed as a prune removes them (version 1 was the damaged one)
        (tmp_path / "db" / "sst2__features.lance" / "_versions" / f"{2**64 - 1 - version}.manifest").unlink()
    gone = "no longer holds version 2, which the table was written with; rebuild table 'sst2'"
    with pytest.raises(RaeeConfigError, match=gone):  # version 2's files removed: no damage, gone
        retrieval.checked_features(db, "sst2", table.schema, ids, None)


def test_a_table_without_a_committed_version_names_the_build_db_that_removes_it(tmp_path):
    """Only an overwrite removes what a killed first build-db left; the line named any build-db, and an append is
    refused with it (sweep T)."""
    (tmp_path / "db" / "t.lance" / "data").mkdir(parents=True)
    (tmp_path / "db" / "t.lance" / "data" / "half.lance").write_bytes(os.urandom(500))
    with pytest.raises(retrieval.Unfinished, match="an overwrite of the table by build-db removes what a stopped"):
        retrieval.open_table(str(tmp_path / "db"), "t")


def test_a_table_whose_data_files_are_gone_is_shown_unreadable_with_its_versions_and_exit_2(tmp_path):
    """Its manifest whole, a data file it names gone (a lost upload, a lifecycle rule): classify would refuse the
    table, so info must not show it sound. It still shows it, with the versions an operator may roll back to, the
    sound table beside it too, then ends with one error line and exit 2."""
    db = tmp_path / "db"
    connection = lancedb.connect(str(db))
    connection.create_table("sound", pa.table({"x": [1, 2]}))
    damaged = connection.create_table("t", pa.table({"x": [1, 2]}))
    damaged.add(pa.table({"x": [3]}))
    assert describe(str(db))["tables"][1]["unreadable"] is None
    newest = max((db / "t.lance" / "data").iterdir(), key=lambda f: f.stat().st_mtime_ns)
    newest.unlink()
    run = run_cli("info", "--db", str(db))
    assert run.returncode == 2
    assert f"error: table(s) t in {db} cannot be read: see above" == run.stderr.strip()
    blocks = dict(block.split(":", 1) for block in run.stdout.split("\n\n"))
    assert "UNREADABLE" not in blocks["table sound"]
    problem = f"UNREADABLE: table 't' cannot be read (damaged or incomplete files?): Not found: {newest};"
    assert problem in blocks["table t"], blocks["table t"]
    assert "   1  " in blocks["table t"] and "   2  " in blocks["table t"]  # the versions, version 1 among them
    as_json = json.loads(run_cli("info", "--db", str(db), "--table", "t", "--json").stdout)
    assert as_json["tables"][0]["unreadable"].startswith("table 't' cannot be read")
    lancedb.connect(str(db)).open_table("t").restore(1)  # version 1's file is whole (rollback refuses a table
    # build-db did not write)
    assert run_cli("info", "--db", str(db), "--table", "t").returncode == 0


def test_rollback_restores_an_earlier_version_as_a_new_one(segment_artifacts, tmp_path):  # noqa: F811
    db = build_twice(segment_artifacts, tmp_path)
    info = rollback(db, "sst2", 1)
    assert (info["restored"], info["previous"], info["version"], info["rows"]) == (1, 2, 3, 32 - 8)
    assert [v["rows"] for v in info["versions"]] == [24, 32, 24]
    retriever = Retriever(db, "sst2")
    assert retriever.rows == 24 and retriever.policy.loo_queries == 24  # the policy fitted with that version

    # a retry (after a kill that came after the restore) leaves it: it restored again, each retry one more copy,
    # which prune --keep then counted, cutting the version the rollback had replaced
    again = run_cli("rollback", "--db", db, "--table", "sst2", "--version", "1")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(
        "table sst2: version 1 already current (as version 3)\ntable sst2: 24 rows, version 3"
    )
    current = run_cli("rollback", "--db", db, "--table", "sst2", "--version", "3")
    assert current.stdout.startswith("table sst2: version 3 already current\n")
    assert run_cli("rollback", "--db", db, "--table", "sst2", "--version", "2").stdout.startswith(
        "table sst2: version 2 restored (was version 3)"
    )
    assert describe(db, "sst2")["tables"][0]["version"] == 4

    with pytest.raises(RaeeConfigError, match=r"table 'sst2' has no version 9 \(versions: 1-4\)"):
        rollback(db, "sst2", 9)

    # another program's edit of a row (its metadata and row count as they were) is no restored copy: it said
    # "version 4 already current (as version 5)", exit 0, the edit kept (audit, session 66)
    edited = lancedb.connect(db).open_table("sst2")
    edited.update(
        where="id = 'a0'", values={"label": 1 - edited.search().where("id = 'a0'").to_arrow()["label"][0].as_py()}
    )
    assert rollback(db, "sst2", 4)["changed"] and describe(db, "sst2")["tables"][0]["version"] == 6


def test_a_rollback_killed_after_its_restore_leaves_its_errors_folder_to_its_retry(segment_artifacts, tmp_path):  # noqa: F811
    """Killed between its restore and its errors folder's update, a rollback leaves that folder as it was (the
    appended run's rejected row still there, though the restored version does not hold that run) until the table's
    next run: its retry says `already current` and settles it (sweep, session 71; the README says so)."""
    db = str(tmp_path / "db")
    first = labelled(tmp_path / "first.parquet", 24, 0, "a", bad=False)
    more = labelled(tmp_path / "more.parquet", 8, 1, "b")  # with bad rows, rejected
    run_build_db(segment_artifacts, "sst2", [str(first)], db, "sst2", "backbone", "overwrite", None)
    run_build_db(segment_artifacts, "sst2", [str(more)], db, "sst2", "backbone", "append", None)
    errors = tmp_path / "db" / "_errors" / "sst2"

    def rejected() -> int:
        return sum(pq.read_metadata(f).num_rows for f in errors.glob("errors-*.parquet"))

    appended = rejected()  # the append's bad rows
    assert appended > 0
    args = ["rollback", "--db", db, "--table", "sst2", "--version", "1"]
    killed = raee_ops(*args, fault="rollback:restored", timeout=60)
    assert killed.returncode == -9 and describe(db, "sst2")["tables"][0]["version"] == 3
    assert rejected() == appended
    retried = run_cli(*args)
    assert retried.returncode == 0 and "version 1 already current (as version 3)" in retried.stdout
    assert rejected() == 0 and describe(db, "sst2")["tables"][0]["version"] == 3


def test_prune_and_rollback_leave_a_damaged_version_as_it_is(segment_artifacts, tmp_path):  # noqa: F811
    """Version 2's data file cut short (a lost upload, a lifecycle rule): prune removed version 1, the whole one a
    rollback mends the table with, exit 0; a rollback to version 2 left the table unreadable, exit 0 (audit,
    session 66). Both are refused now, changing nothing; the rollback to version 1 mends it."""
    db = build_twice(segment_artifacts, tmp_path)
    appended = max((tmp_path / "db" / "sst2.lance" / "data").iterdir(), key=lambda f: f.stat().st_mtime_ns)
    os.truncate(appended, appended.stat().st_size // 2)
    for command in (["prune", "--keep", "1", "--grace", "0"], ["prune", "--table", "sst2", "--keep", "1"]):
        run = run_cli(*command, "--db", db)
        assert run.returncode == 2 and "table 'sst2' cannot be read" in run.stderr, run.stderr
        assert "nothing pruned: a rollback to a whole earlier version mends it" in run.stderr
    assert [v["version"] for v in describe(db, "sst2")["tables"][0]["versions"]] == [1, 2]
    current = run_cli("rollback", "--db", db, "--table", "sst2", "--version", "2")  # it said "already current", 0
    assert current.returncode == 2 and "rollback refused: version 2 of table 'sst2' cannot be read" in current.stderr
    assert run_cli("rollback", "--db", db, "--table", "sst2", "--version", "1").returncode == 0
    assert describe(db, "sst2")["tables"][0]["unreadable"] is None
    back = run_cli("rollback", "--db", db, "--table", "sst2", "--version", "2")
    line = back.stderr.strip().splitlines()[-1]
    assert back.returncode == 2 and line.startswith("error: rollback refused: version 2 of table 'sst2' cannot be read")
    assert describe(db, "sst2")["tables"][0]["version"] == 3  # nothing restored


def test_a_table_folder_the_run_cannot_write_in_is_refused_before_any_work(segment_artifacts, tmp_path):  # noqa: F811
    """A table folder of another user's in a writable --db: build-db's append ran its whole job, then failed at its
    commit, exit 1 (`internal error: … Permission denied`, naming a Rust source file), its rejected rows left staged
    (sweep, session 71). build-db, rollback and prune refuse it before any work: one line, exit 2, nothing made."""
    db = build_twice(segment_artifacts, tmp_path)
    versions = tmp_path / "db" / "sst2.lance" / "_versions"
    versions.chmod(0o555)
    more = labelled(tmp_path / "later.parquet", 8, 1, "c")
    before = sorted(tmp_path.joinpath("db").rglob("*"))
    for args in (
        ["build-db", "--artifacts", segment_artifacts, "--task", "sst2", "--db", db, "--mode", "append"],
        ["rollback", "--db", db, "--table", "sst2", "--version", "1"],
        ["prune", "--db", db, "--table", "sst2", "--keep", "1", "--grace", "0"],
    ):
        args += ["--input", more] if args[0] == "build-db" else []
        run = raee_ops(*args, under=bound_by_permissions(), timeout=120)
        assert run.returncode == 2, run.stderr
        expected = f"error: table 'sst2' in {db}: cannot write in {versions} (permissions, or a read-only filesystem)"
        assert one_error_line(run) == expected
    assert sorted(tmp_path.joinpath("db").rglob("*")) == before
    versions.chmod(0o755)
    # a new table's folders are not there yet: the nearest one that is, the database's work folder here
    work = tmp_path / "db" / "_raee-work"
    work.chmod(0o555)
    args = ["build-db", "--artifacts", segment_artifacts, "--task", "sst2", "--db", db, "--table", "other"]
    run = raee_ops(*args, "--input", more, under=bound_by_permissions(), timeout=120)
    assert run.returncode == 2, run.stderr
    expected = f"error: table 'other' in {db}: cannot write in {work} (permissions, or a read-only filesystem)"
    assert one_error_line(run) == expected
    assert sorted(tmp_path.joinpath("db").rglob("*")) == before
    work.chmod(0o755)


def test_rollback_refuses_while_another_run_holds_the_table(segment_artifacts, tmp_path):  # noqa: F811
    db = build_twice(segment_artifacts, tmp_path)
    with hold(work_dir(db, "sst2"), "table 'sst2'"), pytest.raises(Busy, match="another run is writing table 'sst2'"):
        rollback(db, "sst2", 1)
    assert describe(db, "sst2")["tables"][0]["version"] == 2  # nothing restored under the other run's claim
    assert rollback(db, "sst2", 1)["version"] == 3  # once it is released


def test_info_shows_the_newest_versions_and_says_how_to_remove_old_ones(tmp_path):
    table = lancedb.connect(str(tmp_path)).create_table("t", pa.table({"x": [0]}))
    for n in range(1, 12):
        table.add(pa.table({"x": [n]}))
    text = render(describe(str(tmp_path), "t"))
    assert "versions (12; 2 older not shown, see --json; raee-ops prune removes old ones):" in text
    assert "\n       3  " in text and "\n       2  " not in text


def test_an_empty_object_store_prefix_says_it_may_be_a_typo():
    assert render({"db": "s3://bucket/dbb", "tables": []}).endswith("(an object-store prefix with none: check --db)")
    assert render({"db": "/data/db", "tables": []}) == "/data/db: no tables"  # a local one must exist to get here


def test_info_and_prune_refuse_a_folder_that_holds_no_table_but_other_things(tmp_path):
    """--db naming the artifacts or the input folder (a typo) said "no tables", exit 0; an empty folder, or one
    with only the tool's `_` folders, is still a database with none."""
    other = tmp_path / "artifacts"
    (other / "_raee-work").mkdir(parents=True)
    (other / "lost+found").mkdir()  # a volume's, empty: no reader takes it (recheck, session 66)
    (other / "manifest.json").write_text("{}")
    for command in (["info"], ["prune", "--keep", "1"]):
        run = run_cli(*command, "--db", str(other))
        assert run.returncode == 2 and run.stdout == "", run.stdout
        assert f"{other} is not a LanceDB database: it holds no table but manifest.json (check --db)" in run.stderr
        (other / "manifest.json").unlink()
        run = run_cli(*command, "--db", str(other))
        assert run.returncode == 0 and run.stdout.strip().startswith(f"{other}: no tables"), run.stderr
        (other / "manifest.json").write_text("{}")


def test_prune_keeps_the_newest_versions_those_replaced_lately_and_what_they_were_built_on(
    segment_artifacts,  # noqa: F811
    tmp_path,
):
    """Overwrite (1), append (2), append (3), rollback to 2 (4, built on the companion's version 2): keeping one
    version removes 1-3 and the companion's version 1, keeps its version 2 (what an append of version 4 refits on)
    and its latest; nothing is removed on a dry run, nor within the grace; what is left is read and appended to."""
    db = build_twice(segment_artifacts, tmp_path)
    third = labelled(tmp_path / "third.parquet", 8, 2, "c", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(third)], db, "sst2", "backbone", "append", None)
    assert rollback(db, "sst2", 2)["version"] == 4
    versions = [v["version"] for v in describe(db, "sst2")["tables"][0]["versions"]]

    planned = prune(db, "sst2", 1, timedelta(0), dry_run=True)
    assert (planned.removed, planned.kept, planned.features_removed, planned.features_kept) == (
        [1, 2, 3],
        [4],
        [1],
        [2, 3],
    )
    assert planned.bytes_freed is None and planned.render().startswith("table sst2: would remove versions 1-3; kept")
    within_grace = prune(db, "sst2", 1, timedelta(days=1))  # each was replaced less than a day ago
    assert (within_grace.removed, within_grace.features_removed, within_grace.bytes_freed) == ([], [], 0)
    # says why --keep 1 kept four (it said only "kept versions 1-4", as if --keep were ignored)
    assert within_grace.render().startswith(
        "table sst2: removed no version; kept versions 1-4 (versions 1-3 replaced less than --grace ago)\n"
    )
    assert [v["version"] for v in describe(db, "sst2")["tables"][0]["versions"]] == versions == [1, 2, 3, 4]

    done = run_cli("prune", "--db", db, "--table", "sst2", "--keep", "1", "--grace", "0")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        "table sst2: removed versions 1-3; kept version 4",
        "  sst2__features (probe fit rows): removed version 1; kept versions 2-3",
    ]
    assert lines[2].endswith(" kB freed") and float(lines[2].split()[0]) > 0
    assert [v["version"] for v in describe(db, "sst2")["tables"][0]["versions"]] == [4]
    assert Retriever(db, "sst2").rows == 32  # version 4 reads whole
    more = labelled(tmp_path / "more2.parquet", 8, 3, "d", bad=False)
    run_build_db(segment_artifacts, "sst2", [str(more)], db, "sst2", "backbone", "append", None)  # refits on 2
    assert Retriever(db, "sst2").rows == 40 and Retriever(db, "sst2").probes.fit_rows == 40
    with pytest.raises(RaeeConfigError, match=r"table 'sst2' has no version 1 \(versions: 4-5\)"):
        rollback(db, "sst2", 1)
    again = run_cli("prune", "--db", db, "--table", "sst2", "--keep", "5")  # a retry, or nothing to remove
    assert again.returncode == 0 and again.stdout.startswith("table sst2: removed no version; kept versions 4-5")
    dry = ("--keep", "1", "--grace", "0", "--dry-run", "--json")
    as_json = json.loads(run_cli("prune", "--db", db, "--table", "sst2", *dry).stdout)
    assert as_json["db"] == db and as_json["tables"] == [
        {
            "table": "sst2",
            "removed": [4],
            "kept": [5],
            "features_removed": [2, 3],
            "features_kept": [4],
            "bytes_freed": None,
            "within_grace": [],
        }
    ]


def test_a_dry_run_of_prune_names_the_versions_prune_then_removes(segment_artifacts, tmp_path):  # noqa: F811
    """Versions 1-4 (an overwrite, three appends), then a rollback to 2 (5, built on the companion's version 2):
    keeping one version keeps the companion's 2 and its latest, 4, and LanceDB's cut by age leaves 3 between them.
    The dry run said it would remove 3."""
    db = build_twice(segment_artifacts, tmp_path)
    for name in ("c", "d"):
        rows = labelled(tmp_path / f"{name}.parquet", 8, 2, name, bad=False)
        run_build_db(segment_artifacts, "sst2", [str(rows)], db, "sst2", "backbone", "append", None)
    assert rollback(db, "sst2", 2)["version"] == 5
    planned = prune(db, "sst2", 1, timedelta(0), dry_run=True)
    done = prune(db, "sst2", 1, timedelta(0))
    for pruned in (planned, done):
        assert (pruned.removed, pruned.kept, pruned.features_removed, pruned.features_kept) == (
            [1, 2, 3, 4],
            [5],
            [1],
            [2, 3, 4],
        )
    run_build_db(segment_artifacts, "sst2", [str(rows)], db, "sst2", "backbone", "append", None)  # version 6
    lancedb.connect(db).drop_table("sst2__features")  # a table without a companion: the dry run failed on it
    planned = prune(db, "sst2", 1, timedelta(0), dry_run=True)
    assert (planned.removed, planned.kept, planned.features_removed) == ([5], [6], [])
    assert (prune(db, "sst2", 1, timedelta(0)).removed, planned.features_kept) == ([5], [])


def test_prune_without_a_table_prunes_every_exit_table_and_names_those_another_run_holds(segment_artifacts, tmp_path):  # noqa: F811
    """Two exit tables and one build-db did not write: both exit tables pruned, the other left alone (and refused
    when named); with one of them held by another run, the other is pruned and the command ends with exit 75
    naming the held one."""
    db = build_twice(segment_artifacts, tmp_path)
    rows = labelled(tmp_path / "other.parquet", 8, 4, "o", bad=False)
    for mode in ("overwrite", "overwrite"):
        run_build_db(segment_artifacts, "sst2", [str(rows)], db, "other", "backbone", mode, None)
    lancedb.connect(db).create_table("notes", pa.table({"x": [1]})).add(pa.table({"x": [2]}))  # versions 1, 2

    with hold(work_dir(db, "other"), "table 'other'"), hold(work_dir(db, "sst2"), "table 'sst2'"):
        both = run_cli("prune", "--db", db, "--keep", "1", "--grace", "0")
    assert both.returncode == 75 and both.stdout == "", both.stdout  # it said "no tables written by build-db"
    with hold(work_dir(db, "other"), "table 'other'"):
        partly = run_cli("prune", "--db", db, "--keep", "1", "--grace", "0")
    assert partly.returncode == 75, partly.stderr
    assert partly.stdout.startswith("table sst2: removed version 1; kept version 2")
    assert f"another run is writing table(s) other in {db}: not pruned; retry later" in partly.stderr
    done = json.loads(run_cli("prune", "--db", db, "--keep", "1", "--grace", "0", "--json", "-q").stdout)
    assert [(t["table"], t["removed"], t["kept"]) for t in done["tables"]] == [("other", [1], [2]), ("sst2", [], [2])]
    assert [v["version"] for v in describe(db, "notes")["tables"][0]["versions"]] == [1, 2]
    # named (a misspelt --table): refused, not compacted and pruned as if build-db had written it (exit 0 or 1)
    for named in (["prune", "--keep", "1", "--grace", "0"], ["rollback", "--version", "1"]):
        run = run_cli(*named, "--db", db, "--table", "notes")
        assert run.returncode == 2 and "'notes'" in run.stderr and "not an exit table" in run.stderr, run.stderr
    assert [v["version"] for v in describe(db, "notes")["tables"][0]["versions"]] == [1, 2]
    assert not os.path.exists(os.path.join(db, "_raee-work", "notes"))
    empty = tmp_path / "empty"
    lancedb.connect(str(empty)).create_table("notes", pa.table({"x": [1]}))
    none = run_cli("prune", "--db", str(empty), "--keep", "1")
    assert none.returncode == 0 and none.stdout.strip() == f"{empty}: no tables written by build-db"


def test_prune_refuses_while_another_run_holds_the_table_and_a_bad_option(segment_artifacts, tmp_path):  # noqa: F811
    db = build_twice(segment_artifacts, tmp_path)
    with hold(work_dir(db, "sst2"), "table 'sst2'"):
        busy = run_cli("prune", "--db", db, "--table", "sst2", "--keep", "1", "--grace", "0")
    assert busy.returncode == 75 and "another run is writing table 'sst2'" in busy.stderr
    too_long = ["--keep", "1", "--grace", "99999999999d"]  # past timedelta's range: an internal error, exit 1
    for bad in (["--keep", "0"], ["--keep", "1", "--grace", "5x"], ["--keep", "1", "--grace", "-1h"], too_long):
        run = run_cli("prune", "--db", db, "--table", "sst2", *bad)
        assert run.returncode == 2 and "Invalid value for" in run.stderr, (bad, run.stderr)
    gone = run_cli("prune", "--db", db, "--table", "nope", "--keep", "1")
    assert gone.returncode == 2 and f"no table 'nope' in {db}" in gone.stderr
    assert [v["version"] for v in describe(db, "sst2")["tables"][0]["versions"]] == [1, 2]


def test_the_versions_prune_keeps():
    history = [(1, 0.0), (2, 100.0), (3, 200.0), (4, 300.0)]
    assert to_keep(history, 1, 0, 1000) == {4}
    assert to_keep(history, 2, 0, 1000) == {3, 4}
    assert to_keep(history, 1, 750, 1000) == {3, 4}  # 3 was replaced 700 s ago, 2 800 s ago
    assert to_keep(history, 1, 850, 1000) == {2, 3, 4}
    assert to_keep(history, 9, 0, 1000) == {1, 2, 3, 4}


def test_prune_of_an_indexed_table_keeps_its_rows_index_and_run_record(tmp_path, monkeypatch):
    """LanceDB's clean-up optimizes an index once, as one more version: the same rows, index and recorded run (what a
    retried append recognises as done)."""
    monkeypatch.setattr(retrieval, "INDEX_MIN_ROWS", 1000)
    table, _ = _exit_table(4000)
    db = str(tmp_path / "db")
    for run in ("r1", "r2"):
        read = current_version(db, "large")  # the version this run builds on, as build-db reads it under its claim
        commit(db, "large", table, record=RunRecord(run, "overwrite", f"job-{run}", 0), read=read)  # and its index
        time.sleep(1)  # the cut lies midway between the runs' versions: not within the index build's moment
    pruned = prune(db, "large", 2, timedelta(0))
    assert pruned.removed == [1, 2] and pruned.kept[:2] == [3, 4] and pruned.bytes_freed > 0
    handle = lancedb.connect(db).open_table("large")
    assert RunRecord.of(handle.schema).run_id == "r2" and handle.count_rows() == 4000
    assert handle.list_indices() and handle.list_indices()[0].num_unindexed_rows == 0
