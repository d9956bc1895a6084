"""`json`: is the completion valid JSON, does it fit the example's schema, does it hold the gold fields?

The JSON value is the first JSON object or array in the completion that parses (`extract: true`, the
default: text or a ```json fence around it is ignored), or the whole completion, stripped
(`extract: false`). Components, each 0..1, present when they apply to the example:
- `valid`: a JSON value was found (always present);
- `schema`: it conforms to extras["schema"] (posttrain.rewards.json_schema: type, properties, required,
  enum, items); present when the example has a schema;
- `fields`: the share of gold fields it matches; present when the example has gold: extras["gold"], else
  its `answer` read as JSON. A gold object's fields are its leaves (nested objects are descended into;
  the path a.b looks up value["a"]["b"]); a field matches when the value there equals the gold value
  (numbers by value, 1 == 1.0; booleans only equal booleans; lists and objects element by element).
  A gold value that is not an object is one field: the whole value. With `candidates: true` (BFCL's
  possible_answer convention) each gold leaf is a list of accepted values, and "" in it means the field
  may be left out.
When no JSON value is found, every present component is 0.

Score = sum_k w_k c_k / sum_k w_k over the present components k, with `weights` (default 1 each; a
component missing from `weights` has weight 0). Answer = the JSON value, re-serialised with sorted keys.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from posttrain.rewards.base import RewardError, RewardFunction, RewardResult
from posttrain.examples import PromptExample
from posttrain.rewards.json_schema import schema_errors
from posttrain.rewards.registry import register_reward

COMPONENTS = ("valid", "schema", "fields")
_MISSING = object()


def first_json_value(text: str) -> Any:
    """The first JSON object or array in `text` that parses, or _MISSING."""
    decoder = json.JSONDecoder()
    for i, char in enumerate(text):
        if char in "{[":
            try:
                return decoder.raw_decode(text, i)[0]
            except json.JSONDecodeError:
                continue
    return _MISSING


def json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def gold_fields(gold: dict, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """The leaves of a gold object as (path, value); nested non-empty objects are descended into."""
    leaves = []
    for key, value in gold.items():
        if isinstance(value, dict) and value:
            leaves += gold_fields(value, path + (key,))
        else:
            leaves.append((path + (key,), value))
    return leaves


def _lookup(value: Any, path: tuple) -> Any:
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def field_share(value: Any, gold: Any, candidates: bool) -> float:
    if not isinstance(gold, dict):
        return float(json_equal(value, gold))
    leaves = gold_fields(gold)
    matched = 0
    for path, expected in leaves:
        found = _lookup(value, path)
        if candidates:
            accepted = expected if isinstance(expected, list) else [expected]
            matched += (found is _MISSING and "" in accepted) or (
                found is not _MISSING and any(json_equal(found, a) for a in accepted))
        else:
            matched += found is not _MISSING and json_equal(found, expected)
    return matched / len(leaves)


@register_reward("json")
class JsonReward(RewardFunction):
    components: ClassVar[tuple[str, ...]] = ("valid",)  # `schema` and `fields` where they apply

    @dataclass
    class Params:
        extract: bool = True
        candidates: bool = False
        weights: Optional[dict[str, float]] = None

        def validate(self) -> None:
            for key, weight in (self.weights or {}).items():
                if key not in COMPONENTS:
                    raise ValueError(f"weights: unknown component {key!r}; components: {', '.join(COMPONENTS)}")
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                        or weight < 0:
                    raise ValueError(f"weights.{key} must be a finite number >= 0, got {weight!r}")

    def _gold(self, example: PromptExample) -> Any:
        if "gold" in example.extras:
            return example.extras["gold"]
        if example.answer is None:
            return _MISSING
        try:
            return json.loads(example.answer)
        except json.JSONDecodeError as exc:
            raise RewardError(f"reward 'json': {example.where}: the answer is the gold JSON when the example "
                              f"has no extras['gold'], but it is not JSON ({exc.msg.removesuffix(' at')} at column {exc.colno}): "
                              f"{example.answer!r:.80}") from None

    def __call__(self, completion: str, example: PromptExample) -> RewardResult:
        if self.params.extract:
            value = first_json_value(completion)
        else:
            try:
                value = json.loads(completion.strip())
            except json.JSONDecodeError:
                value = _MISSING
        valid = value is not _MISSING
        components = {"valid": float(valid)}
        if "schema" in example.extras:
            try:
                components["schema"] = float(valid and not schema_errors(value, example.extras["schema"]))
            except ValueError as exc:
                raise RewardError(f"reward 'json': {example.where}: invalid extras['schema']: {exc}") from None
        gold = self._gold(example)
        if gold is not _MISSING:
            components["fields"] = field_share(value, gold, self.params.candidates) if valid else 0.0
        weights = {k: (self.params.weights or dict.fromkeys(COMPONENTS, 1.0)).get(k, 0.0) for k in components}
        total = sum(weights.values())
        if total == 0:
            raise RewardError(f"reward 'json': {example.where}: the weights {self.params.weights} give weight 0 to "
                              f"every component this example has ({', '.join(components)}).")
        score = sum(weights[k] * components[k] for k in components) / total
        answer = json.dumps(value, sort_keys=True, ensure_ascii=False) if valid else None
        return RewardResult(score, answer, components)
