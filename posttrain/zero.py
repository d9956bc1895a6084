"""DeepSpeed ZeRO: the one place that tells the stage of a run and gathers sharded parameters."""

from __future__ import annotations

import contextlib
import time
from typing import Optional


def zero_stage(accelerator) -> Optional[int]:
    """The DeepSpeed ZeRO stage of this run, or None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def gathered(params, stage: Optional[int], modifier_rank: Optional[int] = None):
    """Under ZeRO-3 each process holds a shard of every parameter: a context in which `params` are whole on
    every process (a collective: every process enters it). A no-op under any other stage."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


@contextlib.contextmanager
def timed(context, timings: dict, name: str):
    """Enter `context`, adding the seconds its entry took (the gathering) to timings[name]."""
    t0 = time.time()
    with context:
        timings[name] = timings.get(name, 0.0) + time.time() - t0
        yield
