"""Where an export goes and how it gets there: an --out the export can replace whole without losing anything, the
complete export put in place in one step (local folders swap; an object store's files are copied under a mark, the
manifest last), and an export killed in between mended by the next. Torch-free: the CLI refuses a bad --out in a
second, and the export's Beam pipeline (pipelines/export.py) only calls these.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Sequence

from raee_ops import storage
from raee_ops.commit import (
    CLAIM,
    EXPORT_MARK,
    PUBLISHING,
    check_held,
    export_publishing,
    hold,
    new_run_id,
    run_named,
    say,
    some,
)
from raee_ops.errors import ArtifactError, RaeeConfigError
from raee_ops.faults import fault_point
from raee_ops.schemas.manifest import MANIFEST_NAME, Manifest, check_outside_artifacts, load_manifest

#: A LanceDB table: a folder of this pattern in its database.
TABLE_FOLDERS = "*.lance"
#: The names of the files an export writes beside its manifest (pipelines/export.py, onnx_export/embedder.py): an
#: export killed while publishing them on an object store leaves them without the manifest that lists them.
EXPORT_FILES = (
    "tokenizer.json",
    "embed.onnx",
    "layer_*.onnx",
    "head_*.onnx",
    "embedder_*.onnx",
    "embedder_*_tokenizer.json",
)


def check_out(out_dir: str) -> None:
    """Refuse an --out the export could not replace whole without losing something, or could not write (its
    temporary folder goes beside it)."""
    storage.check_scheme(out_dir, "--out")
    if storage.name(out_dir) in ("", ".", ".."):  # no folder of its own to replace, nor a name to put beside it
        raise RaeeConfigError(f"--out {out_dir or '/'}: name the export's own folder (e.g. artifacts/<model>)")
    storage.check_folder(out_dir, "--out")
    if storage.is_local(out_dir):
        _check_local_out(out_dir)
    check_outside_artifacts(out_dir, "--out", start=storage.parent(out_dir))  # --out itself may be the old export
    check_replaceable(out_dir)


def _check_local_out(out_dir: str) -> None:
    """A link would be replaced by a folder (the export it points to left as it was); the folder beside --out takes
    the temporary one; a database's folder holds tables, and an export there would read as a broken one."""
    if os.path.islink(storage.local_path(out_dir)):
        raise RaeeConfigError(
            f"--out {out_dir} is a symbolic link ({os.readlink(storage.local_path(out_dir))}): give the folder it "
            "points to, or a new one"
        )
    storage.check_folder(storage.parent(out_dir), "--out's folder")
    database = next((d for d in storage.folders_up(storage.parent(out_dir)) if _is_database(d)), None)
    if database is not None:
        storage.check_outside(out_dir, "--out", database)


def _is_database(folder: str) -> bool:
    """A local folder holding a LanceDB table (a `<name>.lance` folder)."""
    return any(os.path.isdir(os.path.join(folder, n)) for n in storage.children(folder, TABLE_FOLDERS))


def check_replaceable(out_dir: str, found_at: str = "") -> None:
    """An export replaces --out whole: one that holds anything its previous export did not write (a database built
    there, notes) is refused, or that would go with it. Its export's files are those its manifest lists; where an
    export was killed while publishing on an object store (its mark), the manifest may be gone and the new export's
    files half copied, so there a file of a name an export gives its files (EXPORT_FILES) counts too, and the mark.
    Claims are skipped on an object store only (a local claim is a lock, never a file). `found_at`: where the old
    export lies now, moved out of the way to be replaced (messages name --out)."""
    folder = found_at or out_dir
    remote = not storage.is_local(out_dir)
    held = [n for n in storage.children(folder) if not (remote and n.startswith(CLAIM))]  # runs' claims, live or not
    if not held:
        return
    publishing = remote and _export_publishing(folder, held)
    if MANIFEST_NAME not in held and not publishing:
        raise RaeeConfigError(
            f"--out {out_dir} holds files that are not an export (no {MANIFEST_NAME}), and an export replaces the "
            "whole folder: choose another --out, or empty it"
        )
    ours = _listed(folder, out_dir) if MANIFEST_NAME in held else {MANIFEST_NAME}
    if publishing:
        ours |= {PUBLISHING} | {n for n in held if is_export_file(n)}
    foreign = sorted(set(held) - ours)
    if foreign:
        what = "a file an export writes" if publishing else f"in its {MANIFEST_NAME}"
        raise RaeeConfigError(
            f"--out {out_dir} holds {some(foreign)}, not part of the export there (not {what}), and an export "
            "replaces the whole folder: move it out, or choose another --out"
        )


def is_export_file(name: str) -> bool:
    """Whether a file's name is one an export gives its files (the manifest aside)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in EXPORT_FILES)


def _export_publishing(folder: str, held: Sequence[str]) -> bool:
    """Whether an object-store folder holds export-onnx's mark of a publish it was killed in (`_publish_remote`):
    the old export's files with or without its manifest, some of the new one's, perhaps the new manifest. Not
    classify's `_PUBLISHING` (a list of its names), nor a local one: a local export is renamed into place whole and
    never leaves one, so there it is a file like any other."""
    return PUBLISHING in held and export_publishing(folder)


def _listed(folder: str, out_dir: str) -> set[str]:
    """The names the manifest in `folder` (--out's export) lists, itself included."""
    try:
        listed = load_manifest(folder, verify_checksums=False, check_seal=False).file_refs()  # an edited one too
    except ArtifactError as exc:
        raise RaeeConfigError(
            f"--out {out_dir}: its {MANIFEST_NAME} cannot be read ({exc}), so which files are an export's is unknown "
            "and replacing the folder could delete others: remove it yourself, or choose another --out"
        ) from exc
    return {ref.file for ref in listed} | {MANIFEST_NAME}


def move_into_place(work: str, out_dir: str) -> None:
    """Replace out_dir by work (local folders) once work is complete, in one step where the filesystem can swap
    two folders, else by moving the old export aside first (`put_back` mends a kill in between). Exports to the
    same place take turns here (the parent's lock), so two at once both end with a complete one.

    Files written into out_dir while this run exported would be deleted with the old export, so it is checked
    again here, and once more when out of the way, before it is deleted (a file written in between); found, the
    old export goes back to out_dir and the run is refused. One window is left, a listing long, between the swap and
    its undoing: a run killed there leaves the old export with the file in work, which the next run removes, and a
    file written into out_dir then goes with the new export, dropped."""
    parent = storage.parent(out_dir)
    with hold(parent, f"the folder of {out_dir}", wait=True):
        if not storage.exists(out_dir):
            storage.rename([(work, out_dir)])
            return
        _check_late_files(out_dir)
        if storage.exchange(work, out_dir):
            fault_point("export:aside")  # work holds the old export now: the run's end (or the next run) removes it
            _check_late_files(out_dir, aside=work, undo=lambda: storage.exchange(work, out_dir))
            return
        old = storage.join(parent, f".{storage.name(out_dir)}.old-{new_run_id()}")
        storage.rename([(out_dir, old)])
        fault_point("export:aside")
        _check_late_files(out_dir, aside=old, undo=lambda: storage.rename([(old, out_dir)]))
        storage.rename([(work, out_dir)])
        storage.delete([old])  # a concurrent run may have reclaimed it


def _check_late_files(out_dir: str, aside: str = "", undo: Callable[[], object] = lambda: None) -> None:
    """Refuse where out_dir's old export (at `aside` once out of the way, to be deleted) holds files its manifest
    does not list, written while this run exported; `undo` first puts it back at out_dir."""
    try:
        check_replaceable(out_dir, found_at=aside)
    except RaeeConfigError as exc:
        undo()
        raise RaeeConfigError(
            f"{exc} (written while this export ran: the old export stays, the new one is dropped)"
        ) from exc


def put_back(out_dir: str) -> None:
    """A run killed between moving the old export aside and the new one in left none at out_dir: the old one goes
    back, before anything else may fail (a local folder's `.old-*` sibling; object stores publish in place)."""
    parent, name = storage.parent(out_dir), storage.name(out_dir)
    with hold(parent, f"the folder of {out_dir}", wait=True):
        aside = run_named(parent, f".{name}.old-")
        if aside and not storage.exists(out_dir):
            storage.rename([(storage.join(parent, aside[-1]), out_dir)])
            say(f"put back {out_dir}: an export killed while replacing it had moved it aside")


def publish_remote(work: str, out_dir: str, manifest: Manifest) -> None:
    """Move the files of an object-store export into place (a copy: an old export cannot stay whole), marked as
    being published first, the old manifest removed, the new one written last; files of the old export that the new
    one does not have are removed at the end. A run killed in between leaves the mark: the folder is an export's,
    without a manifest, which a rerun may replace. --out is checked again first (a file written there while this
    run exported), and only files of the names an export gives its files are removed at the end: one written during
    the copy stays, and the next export refuses the folder."""
    with hold(out_dir, f"--out {out_dir}"):
        _check_late_files(out_dir)
        storage.write_bytes(storage.join(out_dir, PUBLISHING), EXPORT_MARK)  # not empty: S3
        storage.delete([storage.join(out_dir, MANIFEST_NAME)])
        files = sorted({ref.file for ref in manifest.file_refs()})
        storage.rename((storage.join(work, f), storage.join(out_dir, f)) for f in files)
        fault_point("export:publish")
        check_held(out_dir)  # a model's worth of copies: the manifest makes them an export only while ours
        storage.write_bytes(storage.join(out_dir, MANIFEST_NAME), manifest.to_json().encode())
        stale = [n for n in storage.children(out_dir) if n not in files and is_export_file(n)]
        storage.delete([storage.join(out_dir, n) for n in stale])
        storage.delete([storage.join(out_dir, PUBLISHING)])
