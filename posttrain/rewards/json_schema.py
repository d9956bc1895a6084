"""A small JSON-Schema subset validator: `type`, `properties`, `required`, `enum`, `items`.

- `type`: a name or a list of names. JSON Schema's names (object, array, string, number, integer, boolean,
  null) and BFCL's Python ones (dict, list, tuple, float, any) are understood. `integer` accepts 3 and 3.0;
  booleans are neither numbers nor integers.
- `properties`: each present property is checked against its schema; `required`: these must be present.
- `enum`: the value equals one of the listed values.
- `items`: every element of an array is checked against this schema.
Other keywords (description, default, additionalProperties, ...) are ignored.
"""

from __future__ import annotations

from typing import Any

_TYPES = {
    "object": "object", "dict": "object",
    "array": "array", "list": "array", "tuple": "array",
    "string": "string", "number": "number", "float": "number", "integer": "integer",
    "boolean": "boolean", "null": "null", "any": "any",
}


def _has_type(value: Any, kind: str) -> bool:
    if kind == "any":
        return True
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, (int, float))  # number


def schema_errors(value: Any, schema: Any, path: str = "$") -> list[str]:
    """Every way `value` breaks `schema`, as "path: reason" strings; empty when it conforms."""
    if not isinstance(schema, dict):
        raise ValueError(f"schema at {path} must be a JSON object, got {type(schema).__name__}")
    errors = []
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        unknown = [n for n in names if n not in _TYPES]
        if unknown:
            raise ValueError(f"schema at {path}: unknown type {unknown[0]!r} (known: {', '.join(sorted(_TYPES))})")
        if not any(_has_type(value, _TYPES[n]) for n in names):
            return [f"{path}: expected {' or '.join(names)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']!r}")
    if isinstance(value, dict):
        errors += [f"{path}: missing required property {name!r}" for name in schema.get("required", [])
                   if name not in value]
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors += schema_errors(value[name], sub, f"{path}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{i}]")
    return errors
