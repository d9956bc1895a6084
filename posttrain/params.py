"""The parameter convention every plug-in (loss, reward) shares: a `Params` dataclass with the paper's
defaults, validated by its own `validate()` when it has one."""

from __future__ import annotations

from dataclasses import dataclass


class WithParams:
    @dataclass
    class Params:
        pass

    def __init__(self, params=None):
        self.params = params if params is not None else self.Params()
        check = getattr(self.params, "validate", None)
        if callable(check):
            check()
