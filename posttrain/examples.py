"""One prompt of an online-RL data set, with what its rewards need to score a completion.

Read by `posttrain.data.prompts.load_prompt_examples` and scored by `posttrain.rewards`. A leaf module of
its own: reward workers unpickle examples and must not import torch (which `posttrain.data` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class PromptExample:
    """`prompt`: text, or chat messages [{"role", "content"}]. `answer`: the ground-truth final answer as a
    string, or None. `source`/`row`: the file (or "builtin:<task>/<split>") and the 1-based row. `extras`:
    the row's other fields (GSM8K's full solution, MATH's level, a JSON schema, gold fields, ...)."""

    prompt: Union[str, list[dict]]
    answer: Optional[str]
    source: str
    row: int
    extras: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source}, row {self.row}"
