"""Crash-safe checkpoints: a checkpoint is complete, or it does not exist.

``output_dir/checkpoints/checkpoint-<step>/`` holds accelerate's ``save_state`` files (student, optimizer,
scheduler, random states, the teacher and the training state) and a ``COMPLETE`` marker. Every process writes into
``.tmp-checkpoint-<step>`` first; the main process then fsyncs the files, writes the marker and renames the folder
into place (atomic on one filesystem), and only after that deletes the oldest checkpoints beyond the limit. A run
killed at any point therefore leaves its previous checkpoints intact, and at most a ``.tmp-*`` folder that the next
run removes. ``latest`` is the newest complete checkpoint. Folders of the earlier naming (``checkpoint_<i>``,
accelerate's automatic naming) are read as complete and older than any ``checkpoint-<step>``.
"""

import json
import logging
import os
import re
import shutil

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_LEGACY_NAME = re.compile(r"^checkpoint_(\d+)$")
_TEMPORARY_PREFIXES = (".tmp-checkpoint-",)


def _fsync_tree(folder: str) -> None:
    """fsync every file under ``folder`` and the folders themselves (where the platform allows)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(folder: str) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def replace_folder(temporary: str, final: str) -> None:
    """Move the finished folder ``temporary`` to ``final``, replacing an existing one: ``final`` is at every moment
    either the old complete folder or the new one (a crash in between leaves ``<final>.old``, removed next time)."""
    _fsync_tree(temporary)
    previous = f"{final}.old"
    shutil.rmtree(previous, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, previous)
    os.rename(temporary, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))
    shutil.rmtree(previous, ignore_errors=True)


class CheckpointFolder:
    """The checkpoints of one output directory. ``limit``: complete checkpoints kept (0 or less: all)."""

    def __init__(self, output_dir: str, limit: int = 2):
        self.root = os.path.join(output_dir, "checkpoints")
        self.limit = limit

    def complete(self) -> list[str]:
        """Paths of the complete checkpoints, oldest first."""
        if not os.path.isdir(self.root):
            return []
        ranked = []
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if (match := _NAME.match(name)) and os.path.isfile(os.path.join(path, MARKER)):
                ranked.append(((1, int(match[1])), path))
            elif match := _LEGACY_NAME.match(name):
                ranked.append(((0, int(match[1])), path))
        return [path for _, path in sorted(ranked)]

    def latest(self) -> str | None:
        """The newest complete checkpoint, or None."""
        complete = self.complete()
        return complete[-1] if complete else None

    def remove_partial(self) -> None:
        """Delete what an interrupted save left behind (``.tmp-*`` / ``*.old`` folders, unmarked checkpoints)."""
        if not os.path.isdir(self.root):
            return
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            unmarked = _NAME.match(name) and not os.path.isfile(os.path.join(path, MARKER))
            if name.startswith(_TEMPORARY_PREFIXES) or name.endswith(".old") or unmarked:
                logger.warning("removing an incomplete checkpoint left by an interrupted run: %s", path)
                shutil.rmtree(path, ignore_errors=True)

    def save(self, accelerator, step: int, model_config=None) -> str:
        """Save the accelerator's state as ``checkpoint-<step>`` (every process calls this); returns its path.

        ``model_config`` (a ``PretrainedConfig``) is saved alongside as ``config.json``, so the checkpoint alone
        can be exported to a loadable model (``examples/export_checkpoint.py``)."""
        final = os.path.join(self.root, f"checkpoint-{step}")
        temporary = os.path.join(self.root, f".tmp-checkpoint-{step}")
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            os.makedirs(self.root, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(output_dir=temporary)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if model_config is not None:
                model_config.to_json_file(os.path.join(temporary, "config.json"))
            self._commit(temporary, final, step)
        accelerator.wait_for_everyone()
        return final

    def _commit(self, temporary: str, final: str, step: int) -> None:
        """Mark the written folder complete, move it into place (replacing a checkpoint of the same step from an
        earlier run), then apply the retention limit."""
        _fsync_tree(temporary)
        atomic_write_text(os.path.join(temporary, MARKER), json.dumps({"step": step}))
        replace_folder(temporary, final)
        self._prune()

    def _prune(self) -> None:
        complete = self.complete()
        if self.limit <= 0 or len(complete) <= self.limit:
            return
        for path in complete[: len(complete) - self.limit]:
            shutil.rmtree(path, ignore_errors=True)
