"""Bad input, fuzzed (hypothesis): the preference-data readers, the prompt readers and the recipe loader on
generated inputs: truncated and malformed JSON/JSONL, wrong types in every field, invalid UTF-8, empty files,
huge lines, duplicate keys, chat messages with unknown roles, YAML with wrong nesting.

The contract each input is held to: it loads, with every record accounted for (a valid item or an invalid row
naming the file, the row and the field; nothing silently dropped), or it fails with posttrain's own error
naming the file (for a recipe: the key). Any other exception is a traceback a user would see, and fails the
test. Loaded rows are also tokenised with the real SmolLM2 tokenizer and chat template, whose failures must be
posttrain errors naming the row too. The number of inputs and the time are printed at the end of the run;
POSTTRAIN_FUZZ_SCALE=10 runs ten times as many."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.data.prompts import load_prompt_examples
from posttrain.data.readers import load_preference_rows
from posttrain.data.tokenize import tokenize_pairs
from posttrain.errors import PosttrainError
from posttrain.recipe import load_recipe
from posttrain.steps.online_setup import tokenize_prompts

ROOT = Path(__file__).resolve().parents[1]
FUZZ = {"inputs": 0, "seconds": 0.0}  # printed by conftest's terminal summary
SCALE = int(os.environ.get("POSTTRAIN_FUZZ_SCALE", "1"))

# ------------------------------------------------------------------------------------------- generators
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=40)  # lone surrogates included
scalars = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | any_text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
roles = st.sampled_from(["user", "assistant", "system", "tool", "ipython", "robot", "", "USER"]) | json_values
message = st.fixed_dictionaries({"role": roles, "content": any_text | json_values},
                                optional={"name": any_text, "tool_calls": json_values})
messages = st.lists(message | json_values, max_size=4)
field_value = any_text | messages | json_values | st.sampled_from(["\n\nHuman: hi\n\nAssistant: hello", ""])
PAIR_FIELDS = ["prompt", "chosen", "rejected", "messages", "completion", "label", "tools", "chat_template_kwargs"]
PROMPT_FIELDS = ["prompt", "answer", "question", "problem", "reward_model", "ground_truth", "solution", "tools",
                 "chat_template_kwargs"]


def _near_valid_pair():
    turn = st.fixed_dictionaries({"role": roles, "content": any_text})
    chat = st.fixed_dictionaries({"prompt": st.lists(turn, min_size=1, max_size=3),
                                  "chosen": st.lists(turn, min_size=1, max_size=1) | any_text,
                                  "rejected": st.lists(turn, min_size=1, max_size=1) | any_text},
                                 optional={"tools": json_values, "chat_template_kwargs": json_values})
    text = st.fixed_dictionaries({"prompt": any_text, "chosen": any_text, "rejected": any_text})
    hh = st.fixed_dictionaries({"chosen": any_text, "rejected": any_text}).map(
        lambda r: {k: "\n\nHuman: hi\n\nAssistant:" + v for k, v in r.items()})
    kto = st.fixed_dictionaries({"prompt": any_text | messages, "completion": any_text | messages,
                                 "label": st.booleans() | json_values})
    sft = st.fixed_dictionaries({"messages": messages})
    return chat | text | hh | kto | sft


def _near_valid_prompt():
    return (st.fixed_dictionaries({"prompt": any_text | messages}, optional={"answer": json_values,
                                                                            "tools": json_values})
            | st.fixed_dictionaries({"question": any_text, "answer": any_text | st.just("steps #### 42")})
            | st.fixed_dictionaries({"problem": any_text | json_values, "answer": json_values})
            | st.fixed_dictionaries({"prompt": messages, "reward_model": json_values
                                     | st.fixed_dictionaries({"ground_truth": json_values})}))


def records(near_valid, fields):
    random_record = st.dictionaries(st.sampled_from(fields) | st.text(max_size=6), field_value, max_size=5)
    return st.lists(near_valid | near_valid | random_record | json_values, max_size=6)


@st.composite
def files(draw, near_valid, fields):
    """(file name, bytes) of a data file: rows as JSON Lines or a JSON array, then perhaps damaged."""
    rows = draw(records(near_valid, fields))
    ascii_only = draw(st.booleans())
    dumped = [json.dumps(r, ensure_ascii=ascii_only) for r in rows]
    suffix = draw(st.sampled_from([".jsonl", ".json"]))
    if draw(st.booleans()):
        text = "[" + ",\n".join(dumped) + "]"
    else:
        text = draw(st.sampled_from(["\n", "\r\n", "\n\n"])).join(dumped)
    if dumped and draw(st.integers(0, 9)) == 0:  # a key given twice in one row
        text = text.replace("{", '{"chosen": "first", "prompt": "first", ', 1)
    if draw(st.integers(0, 29)) == 0:  # a long line (a huge one is test_a_huge_line_loads below)
        text += "\n" + json.dumps({"prompt": "long " * 2_000, "chosen": " a", "rejected": " b"})
    data = text.encode("utf-8", errors="surrogatepass")
    damage = draw(st.sampled_from(["none", "none", "truncate", "insert", "bom", "empty", "blank"]))
    if damage == "truncate" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "insert":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"{", b"}", b"\x00", b"\n", b'"', b",", b"]"])) \
            + data[at:]
    elif damage == "bom":
        data = b"\xef\xbb\xbf" + data
    elif damage == "empty":
        data = b""
    elif damage == "blank":
        data = b"\n \n\t\n"
    return suffix, data


# -------------------------------------------------------------------------------------------- the contract
def expected_row_numbers(data: bytes, suffix: str):
    """The row numbers the readers must account for, or None where the file itself is unreadable (bad UTF-8,
    invalid JSON), which must be an error. Mirrors the documented reading rules: a JSON array, else one record
    per non-blank line, numbered by line."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    if text.lstrip().startswith("["):
        try:
            whole = json.loads(text)
            return list(range(1, len(whole) + 1))
        except json.JSONDecodeError:
            if suffix == ".json":
                return None
    numbers = []
    for i, line in enumerate(text.split("\n")):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError:
                return None
            numbers.append(i + 1)
    return numbers


def assert_posttrain_error_names(exc: BaseException, *names: str) -> None:
    assert isinstance(exc, PosttrainError), f"{type(exc).__name__} instead of a posttrain error: {exc}"
    message = str(exc)
    assert any(name in message for name in names), (names, message)
    assert message.strip() and "Traceback" not in message


def check_accounted(path: Path, expected, items, invalid) -> None:
    assert expected is not None, f"unreadable file {path.name} loaded"
    numbers = sorted([item.row for item in items] + [bad.row for bad in invalid])
    assert numbers == expected, ("rows lost or counted twice", numbers, expected)
    for bad in invalid:
        text = str(bad)
        assert str(path) in text and f"row {bad.row}" in text and bad.field, text


def fuzz(check, strategy, examples: int) -> None:
    """Run `check` on `examples` generated inputs (asserting that many ran) and add them to the count."""
    count, start, examples = 0, time.perf_counter(), examples * SCALE

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case):
        nonlocal count
        count += 1
        check(case)

    run()
    FUZZ["inputs"] += count
    FUZZ["seconds"] += time.perf_counter() - start
    assert count >= examples, count


def write_case(directory: Path, suffix: str, data: bytes) -> Path:
    path = directory / f"data{FUZZ['inputs']}-{time.perf_counter_ns()}{suffix}"
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------------- tests
def test_preference_files_load_every_row_or_fail_naming_the_file(tmp_path, tokenizer):
    def check(case):
        (suffix, data), fmt, template = case
        path = write_case(tmp_path, suffix, data)
        expected = expected_row_numbers(data, suffix)
        try:
            rows, invalid = load_preference_rows(str(path), fmt)
        except Exception as exc:  # noqa: BLE001 - what kind of error is the point
            assert_posttrain_error_names(exc, str(path))
            return
        check_accounted(path, expected, rows, invalid)
        try:
            pairs, untrainable, _ = tokenize_pairs(rows, tokenizer, template, max_length=48)
        except Exception as exc:  # noqa: BLE001
            assert_posttrain_error_names(exc, str(path))
            return
        assert len(pairs) + len(untrainable) == len(rows)

    fuzz(check, st.tuples(files(_near_valid_pair(), PAIR_FIELDS), st.sampled_from(["auto", "trl", "hh", "sft", "kto"]),
                          st.sampled_from(["auto", "chat", "plain"])), examples=900)


def test_prompt_files_load_every_row_or_fail_naming_the_file(tmp_path, tokenizer):
    def check(case):
        (suffix, data), fmt, template = case
        path = write_case(tmp_path, suffix, data)
        expected = expected_row_numbers(data, suffix)
        try:
            examples, skipped = load_prompt_examples(str(path), fmt, invalid_rows="skip",
                                                     skipped_path=tmp_path / "skipped.jsonl")
        except Exception as exc:  # noqa: BLE001
            assert_posttrain_error_names(exc, str(path))
            return
        assert expected is not None and len(examples) + skipped == len(expected), (len(examples), skipped, expected)
        try:
            tokenize_prompts(examples, tokenizer, template, None)
        except Exception as exc:  # noqa: BLE001
            assert_posttrain_error_names(exc, str(path))

    fuzz(check, st.tuples(files(_near_valid_prompt(), PROMPT_FIELDS),
                          st.sampled_from(["auto", "prompt_answer", "gsm8k", "math", "rl"]),
                          st.sampled_from(["auto", "chat", "plain"])), examples=600)


SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


@st.composite
def recipe_texts(draw):
    """(YAML text, the dotted key that was changed or None) from a shipped recipe with one mistake."""
    raw = yaml.safe_load(draw(st.sampled_from(SHIPPED)).read_text())
    paths = [p for p in _paths(raw) if p]
    path = draw(st.sampled_from(paths))
    parent = raw
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    op = draw(st.sampled_from(["value", "value", "delete", "typo", "nest", "wrap", "text"]))
    if op == "value":
        parent[last] = draw(json_values | st.sampled_from([[], {}, "1e-4", -1, 0, 10**9, "auto", True]))
    elif op == "delete" and isinstance(parent, dict):
        del parent[last]
    elif op == "typo" and isinstance(parent, dict):
        parent[str(last) + draw(st.sampled_from(["_", "s", "x"]))] = parent.pop(last)
    elif op == "nest":
        parent[last] = {"value": parent[last]}
    elif op == "wrap":
        parent[last] = [parent[last]]
    text = yaml.safe_dump(raw, allow_unicode=True)
    if op == "text":
        damage = draw(st.sampled_from(["truncate", "tab", "dup", "colon"]))
        if damage == "truncate":
            text = text[:draw(st.integers(0, len(text)))]
        elif damage == "tab":
            text = text.replace("  ", "\t", 1)
        elif damage == "dup":
            text = text + text.splitlines()[0] + "\n"  # a top-level section given twice
        else:
            text = text.replace(":", "", 1)
        return text, None
    return text, ".".join(str(p) for p in path)


def test_recipes_with_one_mistake_load_or_fail_naming_the_key(tmp_path):
    def check(case):
        text, key = case
        path = write_case(tmp_path, ".yaml", text.encode("utf-8", errors="surrogatepass"))
        try:
            load_recipe(path)
        except Exception as exc:  # noqa: BLE001
            names = [str(path)] + ([] if key is None else [part for part in key.split(".") if not part.isdigit()])
            assert_posttrain_error_names(exc, *names)

    fuzz(check, recipe_texts(), examples=700)


def test_a_key_given_twice_is_an_invalid_row_not_a_lost_value(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": " x", "chosen": " y", "rejected": " z"}\n')
    rows, invalid = load_preference_rows(str(path))
    assert rows == [] and [(bad.row, bad.field) for bad in invalid] == [(1, "chosen")]
    assert "given twice" in invalid[0].reason


def test_a_huge_line_loads(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "word " * 2_000_000, "chosen": " a", "rejected": " b"}, {"prompt": "q", "chosen": " a",
                                                                                "rejected": " b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded, invalid = load_preference_rows(str(path))
    assert invalid == [] and [len(r.prompt) for r in loaded] == [10_000_000, 1]
