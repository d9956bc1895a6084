"""Callbacks: code of the user's (or a test's) that runs at fixed points of training, named in the recipe as
`run.callbacks: ["module.path:ClassName", ...]` (built with no arguments, imported like plug-ins).

A callback defines any of:

    on_step_end(event: StepEnd)                   after every optimiser step, on every process
    before_checkpoint_rename(step, staging_dir)   a checkpoint's files are written, not yet renamed into place
    on_checkpoint(step, path)                     a checkpoint is complete at `path`

Production code carries no test probes: kill-at-a-checkpoint and per-step parameter hashes are callbacks
in tests/callbacks.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from posttrain.imports import import_object


class Callback:
    """Base class: every hook does nothing."""

    def on_step_end(self, event: "StepEnd") -> None:
        pass

    def before_checkpoint_rename(self, step: int, staging_dir: Path) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass


@dataclass
class StepEnd:
    """After optimiser step `step` (1-based): its reduced `record`, this process's `rank` of `world`, the
    micro-batches of example indices it trained on (`rows`, None for online steps), the trainable parameters
    by name, and `gathered()`: a context in which they are whole (ZeRO-3; a collective)."""

    step: int
    record: dict
    rank: int
    world: int
    rows: Optional[list]
    trainable: list
    gathered: Callable[[], Any]


def build_callbacks(references: Iterable[str], search_dirs: Iterable[Path] = ()) -> list[Callback]:
    return [import_object(ref, search_dirs, f"run.callbacks {ref!r}", Callback)() for ref in references]
