"""Where a command may write: never over one of its inputs, never into a folder it reads, never one path twice.

Torch-free, so that the CLI checks its paths before it imports anything heavy or loads a model.
"""
from __future__ import annotations

import os
from pathlib import Path


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _same_file(a: Path, b: Path) -> bool:
    """The same path after resolving links, or two names of one file (a hard link)."""
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(command: str, outputs: dict, inputs: dict, folders=(), output_folders=()) -> None:
    """Refuse (ValueError), before any work, outputs that would overwrite what ``command`` reads, then create every
    output's parent folder (and each of ``output_folders``), so that a long run cannot end unable to write.

    ``outputs`` / ``inputs``: {label: path or None}; ``folders``: labels of inputs that are folders the command reads
    (a model folder, a parquet folder: nothing may be written inside them); ``output_folders``: labels of outputs that
    are folders (nothing the command reads may lie inside them). An input that is an existing folder counts as one of
    ``folders``. Paths are compared after ``Path.resolve`` (symbolic
    links, ``..``) and with ``os.path.samefile`` (hard links)."""
    outs = {k: Path(v).expanduser().resolve() for k, v in outputs.items() if v is not None}
    ins = {k: Path(v).expanduser().resolve() for k, v in inputs.items() if v is not None}
    labels = list(outs)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if _same_file(outs[a], outs[b]) or (b in output_folders and _inside(outs[a], outs[b])) \
                    or (a in output_folders and _inside(outs[b], outs[a])):
                raise ValueError(f"{command}: {a} and {b} are the same path ({outputs[a]}): give each output its own")
    for out_label, out in outs.items():
        for in_label, src in ins.items():
            if _same_file(out, src):
                raise ValueError(f"{command}: {out_label} {outputs[out_label]} is the {in_label} it reads: "
                                 "writing it would destroy the input; choose another path")
            if (in_label in folders or src.is_dir()) and _inside(out, src):
                raise ValueError(f"{command}: {out_label} {outputs[out_label]} lies inside the {in_label} folder "
                                 f"{inputs[in_label]}, which it reads: write it elsewhere")
            if out_label in output_folders and _inside(src, out):
                raise ValueError(f"{command}: the {in_label} {inputs[in_label]} lies inside the output folder "
                                 f"{out_label} {outputs[out_label]}: choose another output folder")
    for out_label, out in outs.items():
        folder = out if out_label in output_folders else out.parent
        if out_label not in output_folders and out.is_dir():
            raise ValueError(f"{command}: {out_label} {outputs[out_label]} is a folder, not a file path")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ValueError(f"{command}: cannot create the folder of {out_label} {outputs[out_label]}: "
                             f"{folder} or one above it is a file") from None
        except OSError as e:
            raise ValueError(f"{command}: cannot create the folder of {out_label} {outputs[out_label]} ({e.strerror})") \
                from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{command}: cannot write {out_label} {outputs[out_label]}: no write permission in {folder}")
