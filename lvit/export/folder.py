"""The folder an export goes to: checked before any work (never the run, never anything but an earlier export
replaced), written beside it and moved into place only once the self-check passed."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lvit.errors import LvitError
from lvit.runs.files import (
    EXPORT_INFO_FILE,
    is_run_folder,
)


def check_out_dir(out: Path, run_path: Path, overwrite: bool) -> None:
    """Refuse `out` before any work when it is the run (or holds it), a file, or a non-empty folder without
    `overwrite`; with it, anything but an earlier export (`_check_replaceable`)."""
    resolved, run_resolved = out.resolve(), run_path.resolve()
    if resolved == run_resolved or resolved in run_resolved.parents:
        raise LvitError(
            f"lvit export: --out {out} is the run folder {run_path} or holds it; exporting there would "
            "destroy the run. Choose a folder outside it."
        )
    if out.exists() and not out.is_dir():
        raise LvitError(f"lvit export: --out {out} exists and is a file; choose a folder path.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise LvitError(
                f"lvit export: --out {out} exists and is not empty; lvit does not overwrite it. Choose another "
                "folder, remove it yourself, or pass --overwrite to replace an earlier export (only once the new "
                "export has passed its self-check)."
            )
        _check_replaceable(out)


def _check_replaceable(out: Path) -> None:
    """`--overwrite` replaces only what `lvit export` wrote: a flat folder with its `lvit_export.json`. A training
    run, a checkpoint, a folder of runs or anything else is refused, named, and left as it is."""
    if not (out / EXPORT_INFO_FILE).is_file():
        what = "a training run" if is_run_folder(out) else f"not an lvit export (it has no {EXPORT_INFO_FILE})"
        raise LvitError(
            f"lvit export: --out {out} is {what}; --overwrite replaces only an earlier `lvit export`. Choose "
            "another folder, or move this one away yourself."
        )
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    if folders:
        raise LvitError(
            f"lvit export: --out {out} holds folders an export never writes ({', '.join(folders[:3])}); "
            "--overwrite would delete them. Choose another folder, or move them away yourself."
        )


@contextmanager
def temporary_folder(out: Path) -> Iterator[Path]:
    """A fresh sibling of `out` to write the export into; on any failure it is removed, with the parent
    folders it created."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted export of this same process id
    created = [p for p in reversed(tmp.parents) if not p.exists()]  # parent folders this export creates
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(created):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the checked export to `out`; an existing `out` (--overwrite) is replaced only now."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
