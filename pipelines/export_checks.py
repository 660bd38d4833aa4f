"""What an export-onnx request must fit that is known before torch loads (its and transformers' imports take ~20 s,
the model minutes): --out can be replaced whole, --model's files are there, the embedders exist. Torch-free, so the
CLI refuses a typo in a second; run_export checks the same before it loads anything.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence

from raee_ops.onnx_export.model_source import resolve
from raee_ops.pipelines.options import check_job_service
from raee_ops.schemas.manifest import MANIFEST_NAME, check_outside_artifacts, load_manifest

from raee_ops import storage
from raee_ops.commit import CLAIM, PUBLISHING, export_publishing, some
from raee_ops.errors import ArtifactError, RaeeConfigError
from raee_ops.key_names import embedder_depth

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


def check_before_loading(model_spec: str, out_dir: str, embedders: Sequence[str], beam_args: Sequence[str]) -> None:
    """Refuse the request's --out, embedders (their packaged configs) or --model (its files, not its config) with
    one line; `beam_args` carry the object store's settings."""
    storage.configure(beam_args)
    check_out(out_dir)
    if len(set(embedders)) != len(embedders):
        raise RaeeConfigError(f"embedder names must be distinct: {', '.join(embedders)}")
    for name in embedders:
        embedder_depth(name)
    resolve(model_spec)
    check_job_service(beam_args)


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
