"""Copying a model folder's non-weight files (config, tokenizer, generation config) into an output folder."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger("gradmatch.checkpoints")


#: Files and folders of a model folder that are weights or training artefacts, never copied to a merge.
_WEIGHT_FILE = re.compile(
    r"(.*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin|.*\.bin\.index\.json|tf_model.*\.h5"
    r"|flax_model.*\.msgpack|model\.ckpt.*|training_metadata\.json|fisher\.json|merge\.json|\.gradmatch-.*"
    r"|.*\.pt|.*\.pth|training_args\.bin|trainer_state\.json|adapter_model\..*)"
)

_SKIPPED_DIRS = re.compile(r"(hessian|head_init|checkpoint-.*|runs|\..*)")


def _link_roots(folder: Path) -> list[Path]:
    """Where the files that links in ``folder`` point to may lie: the folder itself, and for a snapshot of
    the Hugging Face hub cache (``models--org--name/snapshots/<rev>``, whose files are links into
    ``models--org--name/blobs``) that cache entry."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.split("--")[0] in ("models", "datasets", "spaces"):
        roots.append(real.parent.parent)
    return roots


def copy_non_weight_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """Copy every file of model folder ``src`` except weights byte for byte into ``dst`` (config,
    tokenizer, image processor, generation config, sentence-transformers modules ...).

    Links are followed only to files inside ``src`` (or, for a hub-cache snapshot, inside its cache
    entry); a link to a file elsewhere is skipped with a warning, so a merge never carries a stray
    file into its output. Links to folders are never followed (a link to ``.`` would recurse forever).
    """
    src, dst = Path(src), Path(dst)
    return _copy_tree(src, dst, _link_roots(src))


def _copy_tree(src: Path, dst: Path, roots: list[Path]) -> list[Path]:
    copied = []
    for entry in sorted(src.iterdir()):
        if entry.is_symlink():
            target = entry.resolve()
            if target.is_dir():
                log.warning("not copying %s: it is a link to a folder (%s)", entry, target)
                continue
            if not any(root == target or root in target.parents for root in roots):
                log.warning("not copying %s: it is a link to %s, outside the model folder", entry, target)
                continue
        if entry.is_dir():
            if not _SKIPPED_DIRS.fullmatch(entry.name):
                (dst / entry.name).mkdir(exist_ok=True)
                copied += _copy_tree(entry, dst / entry.name, roots)
        elif entry.is_file() and not _WEIGHT_FILE.fullmatch(entry.name):
            shutil.copyfile(entry, dst / entry.name)
            copied.append(dst / entry.name)
    return copied
