"""User-facing errors: one paragraph that names what is wrong and how to fix it.

The CLI prints these without a traceback and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class PosttrainError(Exception):
    """A mistake in the user's input (recipe, data, paths) rather than a bug in posttrain."""


class RecipeError(PosttrainError):
    """The recipe (YAML or --set override) is invalid: one or more `problems`, reported together."""

    def __init__(self, *problems: str, source: str = ""):
        self.problems = list(problems)
        if len(problems) == 1:
            message = f"recipe {source}: {problems[0]}" if source else problems[0]
        else:
            message = (f"the recipe{' ' + source if source else ''} has {len(problems)} problems:\n"
                       + "\n".join(f"  - {p}" for p in problems))
        super().__init__(message)


class DataError(PosttrainError):
    """A data file or row is invalid; the message names the file, the row and the field."""


class ModelError(PosttrainError):
    """A model or tokenizer cannot be found or loaded."""


class RolloutEngineError(PosttrainError):
    """The generation engine failed: it died, did not answer in time, or its weights are not the trainer's."""
