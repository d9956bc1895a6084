"""Rewards: answer extraction, the built-in verifiers on real GSM8K / DeepScaleR / BFCL / PHEE rows, the
registry and user rewards, weighted combination, and the worker pool's time limit and error reports."""

from __future__ import annotations

import json
import math
import re
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import SHARED_DATA
from posttrain.data.prompts import load_prompt_examples
from posttrain.errors import RecipeError
from posttrain.rewards import (REWARDS, PromptExample, RewardError, RewardFunction, RewardResult, RewardTerm,
                               build_reward_function, build_reward_set, register_reward, validate_reward_terms)
from posttrain.rewards.answers import extract_answer, numbers_equal, parse_number
from posttrain.rewards.json_schema import schema_errors

ROOT = Path(__file__).resolve().parents[1]
GSM8K = SHARED_DATA / "gsm8k" / "train.jsonl"
DSR = SHARED_DATA / "one-shot-rlvr" / "dsr_sub.parquet"
BFCL = SHARED_DATA / "bfcl" / "BFCL_v4_simple_python.json"
BFCL_ANSWERS = SHARED_DATA / "bfcl" / "possible_answer" / "BFCL_v4_simple_python.json"
PHEE = SHARED_DATA / "phee" / "train.json"


def example(answer, extras=None, row=7) -> PromptExample:
    return PromptExample("a prompt", answer, "t.jsonl", row, extras or {})


def reward(name, **params):
    return build_reward_function(RewardTerm(name, params=params))


def write_module(directory: Path, name: str, code: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(textwrap.dedent(code))
    return directory


# ------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 24 in May.\nSo 48+24 = 72.\n#### 72", "72"),
    ("#### $1,000 in total", "1,000"),
    ("first #### 3\nthen corrected #### 4.5 apples", "4.5"),
    ("#### \\frac{1}{2}", "\\frac{1}{2}"),
    ("#### 3/4", "3/4"),
    ("#### 10^3", "10^3"),
    ("the sum is \\boxed{12} and #### 13", "13"),                       # "####" comes first
    ("#### \nThe answer is \\boxed{7}.", "7"),                         # an empty "####" line: next rule
    ("So $x = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("\\boxed{1} at first, finally \\boxed{ 2 }", "2"),                # the last box, stripped
    ("\\boxed{5} then \\boxed{\\frac{1}{2", "5"),                      # a truncated last box: the last balanced one
    ("\\fbox{x+1}", "x+1"),
    ("I got 3 apples, then 4.5 more, -2 lost", "-2"),
    ("costs $1,250 per month", "1,250"),
    ("version v2 of x3 has 12 parts.", "12"),                          # digits inside words are not numbers
    ("no digits at all", None),
    ("", None),
])
def test_extract_answer_order(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, value", [
    ("72", 72.0), ("1,000", 1000.0), ("$1,000.", 1000.0), ("\\$18", 18.0), ("50%", 50.0), ("99\\%", 99.0),
    ("-3.25", -3.25), (".5", 0.5), ("1e-3", 0.001), ("1\\,000", 1000.0), ("\u22124", -4.0),
    ("\\frac{1}{2}", None), ("3/4", None), ("12 apples", None), ("x", None), ("", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_numbers_equal_uses_a_relative_tolerance_of_1e_6():
    assert numbers_equal(1_000_000.0, 1_000_000.9)       # 9e-7 relative
    assert not numbers_equal(1_000_000.0, 1_000_002.0)   # 2e-6
    assert numbers_equal(12.8, 12.8000001) and not numbers_equal(12.8, 12.81)
    assert numbers_equal(0.0, 0.0) and not numbers_equal(0.0, 1e-9)


# ------------------------------------------------------------------------------------------------- math
def test_math_reward_on_gsm8k_gold_solutions():
    examples, _ = load_prompt_examples(str(GSM8K), limit=200)
    math_reward = reward("math")
    right = [math_reward(e.extras["solution"], e) for e in examples]
    assert all(r.score == 1.0 and r.components == {"correct": 1.0} and r.answer == e.answer
               for r, e in zip(right, examples))
    off_by_one = [math_reward(f"Worked it out.\n#### {float(e.answer) + 1:g}", e) for e in examples]
    assert all(r.score == 0.0 for r in off_by_one)


@pytest.mark.parametrize("completion, gold, correct", [
    ("So the total is $1,000.", "1000", 1.0),                  # last number, commas and trailing "."
    ("#### $18", "18", 1.0),
    ("That is 50% of it: \\boxed{50\\%}", "50", 1.0),
    ("\\boxed{12.8000001}", "12.8", 1.0),                       # within 1e-6
    ("\\boxed{12.81}", "12.8", 0.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),                      # math-verify
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt2}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt2}{2}}", "\\sqrt{2}/2", 1.0),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{x^2+1}", "1+x^2", 1.0),
    ("\\boxed{[-2, 3)}", "[-2,3)", 1.0),
    ("\\boxed{(-2, 3)}", "[-2,3)", 0.0),
    ("I cannot solve this.", "7", 0.0),
])
def test_math_reward_compares_numbers_then_latex(completion, gold, correct):
    assert reward("math")(completion, example(gold)).score == correct


def test_math_reward_on_deepscaler_latex_ground_truths():
    examples, _ = load_prompt_examples(str(DSR), invalid_rows="skip", limit=40)
    by_answer = {e.answer: e for e in examples}
    cases = [  # (ground truth in the file, a completion in another notation, correct)
        ("\\frac{3}{7}", "The probability is \\boxed{3/7}.", 1.0),
        ("\\frac{3}{7}", "The probability is \\boxed{\\frac{4}{7}}.", 0.0),
        ("\\frac{3\\sqrt{2}}{2}", "\\boxed{\\frac{3}{\\sqrt{2}}}", 1.0),
        ("\\dfrac{5}{8}", "\\boxed{0.625}", 1.0),
        ("$\\frac{40}{9}$", "\\boxed{\\dfrac{40}{9}}", 1.0),
        ("4- \\sqrt {3}", "\\boxed{4-\\sqrt3}", 1.0),
        ("99\\%", "#### 99", 1.0),
        ("-30.06", "#### -30.060", 1.0),
        ("-\\frac{\\sqrt{2}}{3}", "\\boxed{\\frac{\\sqrt{2}}{3}}", 0.0),
    ]
    math_reward = reward("math")
    for gold, completion, correct in cases:
        result = math_reward(completion, by_answer[gold])
        assert result.score == correct, (gold, completion)
        assert result.answer == extract_answer(completion)


def test_math_reward_without_a_ground_truth_names_the_row():
    with pytest.raises(RewardError, match=r"reward 'math' compares with the example's answer, but t.jsonl, row 7 "
                                          r"has none"):
        reward("math")("\\boxed{1}", example(None))


def test_math_reward_with_no_answer_in_the_completion():
    result = reward("math")("I do not know.", example("3"))
    assert (result.score, result.answer, result.components) == (0.0, None, {"correct": 0.0})


# ------------------------------------------------------------------------------------------ exact_match
def test_exact_match_on_the_builtin_arithmetic_task():
    examples, _ = load_prompt_examples("builtin:arithmetic", limit=3)
    e = examples[0]
    extracting, whole = reward("exact_match"), reward("exact_match", extract=False)
    assert extracting(f"The answer is {e.answer}.", e).score == 1.0
    assert whole(f"The answer is {e.answer}.", e).score == 0.0
    assert whole(f"  {e.answer}\n", e).score == 1.0 and whole(f"  {e.answer}\n", e).answer == e.answer
    assert extracting(f"0{e.answer}", e).score == 0.0              # exact: no numeric equivalence
    assert extracting(f"{int(e.answer) + 1}", e).components == {"correct": 0.0}


# ------------------------------------------------------------------------------------------------- json
def bfcl_example(index: int) -> PromptExample:
    """A BFCL simple_python row as a prompt example: the call as {function: {argument: value}}."""
    question = json.loads(BFCL.read_text().splitlines()[index])
    gold = json.loads(BFCL_ANSWERS.read_text().splitlines()[index])
    assert question["id"] == gold["id"] == f"simple_python_{index}"
    function = question["function"][0]
    name = function["name"]
    schema = {"type": "object", "properties": {name: function["parameters"]}, "required": [name]}
    return PromptExample(question["question"][0], None, str(BFCL), index + 1,
                         {"schema": schema, "gold": gold["ground_truth"][0]})


@pytest.mark.parametrize("index, completion, valid, schema, fields", [
    (0, 'Calling it:\n```json\n{"calculate_triangle_area": {"base": 10, "height": 5}}\n```', 1, 1, 1),
    (0, '{"calculate_triangle_area": {"base": 10, "height": 5, "unit": "units"}}', 1, 1, 1),
    (0, '{"calculate_triangle_area": {"base": 10, "height": 6}}', 1, 1, 2 / 3),
    (0, '{"calculate_triangle_area": {"base": "10", "height": 5}}', 1, 0, 2 / 3),   # a string, not an integer
    (0, '{"calculate_triangle_area": {"base": 10}}', 1, 0, 2 / 3),                 # height is required
    (0, '{"triangle_area": {"base": 10, "height": 5}}', 1, 0, 1 / 3),              # wrong function: only unit's ""
    (0, 'calculate_triangle_area(base=10, height=5)', 0, 0, 0),
    (34, '{"travel_itinerary_generator": {"destination": "Tokyo", "days": 7, "daily_budget": 100, '
         '"exploration_type": "nature"}}', 1, 1, 1),
    (34, '{"travel_itinerary_generator": {"destination": "Tokyo", "days": 7, "daily_budget": 100, '
         '"exploration_type": "beach"}}', 1, 0, 3 / 4),                             # not in the enum
    (13, '{"calculate_area_under_curve": {"function": "x**2", "interval": [1, 3]}}', 1, 1, 1),  # 1 == 1.0
    (13, '{"calculate_area_under_curve": {"function": "x**2", "interval": [1, "3"]}}', 1, 0, 2 / 3),  # items
])
def test_json_reward_on_bfcl_calls(index, completion, valid, schema, fields):
    result = reward("json", candidates=True)(completion, bfcl_example(index))
    assert result.components == pytest.approx({"valid": valid, "schema": schema, "fields": fields})
    assert result.score == pytest.approx((valid + schema + fields) / 3)
    assert (result.answer is None) == (not valid)


def test_json_reward_on_a_phee_event():
    record = json.loads(PHEE.read_text().splitlines()[0])
    event = record["annotations"][0]["events"][0]
    gold = {"treatment": {"drug": event["Treatment"]["Drug"]["text"][0][0]}, "effect": event["Effect"]["text"][0][0]}
    assert gold == {"treatment": {"drug": "insulin"}, "effect": "lipoatrophies"}
    e = PromptExample(record["context"], json.dumps(gold), str(PHEE), 1)     # gold given as the answer's JSON
    json_reward = reward("json")
    right = json_reward('{"effect": "lipoatrophies", "treatment": {"drug": "insulin", "disorder": "diabetic"}}', e)
    assert right.components == {"valid": 1.0, "fields": 1.0} and right.score == 1.0
    half = json_reward('Events: {"effect": "lipoatrophy", "treatment": {"drug": "insulin"}}', e)
    assert half.components == {"valid": 1.0, "fields": 0.5} and half.score == 0.75
    flat = json_reward('{"effect": "lipoatrophies", "drug": "insulin"}', e)   # treatment.drug is a path
    assert flat.components["fields"] == 0.5
    assert json.loads(right.answer) == json.loads(right.answer) and right.answer.startswith('{"effect"')


def test_json_reward_options():
    e = example('{"a": 1, "b": [1, 2]}', {"schema": {"type": "object", "required": ["a"]}})
    assert reward("json")('text {"a": 1.0, "b": [1, 2]} more', e).score == 1.0
    assert reward("json", extract=False)('text {"a": 1, "b": [1, 2]}', e).components == {
        "valid": 0.0, "schema": 0.0, "fields": 0.0}
    assert reward("json", extract=False)(' {"a": 1, "b": [1, 2]}\n', e).score == 1.0
    weighted = reward("json", weights={"fields": 3.0, "valid": 1.0})('{"a": 1, "b": [2, 1]}', e)
    assert weighted.components == {"valid": 1.0, "schema": 1.0, "fields": 0.5}
    assert weighted.score == pytest.approx((1.0 + 3 * 0.5) / 4)              # schema has weight 0
    assert reward("json")('{"a": true}', example('{"a": 1}')).components["fields"] == 0.0   # true is not 1
    assert reward("json")('[1, 2]', example('[1, 2]')).components == {"valid": 1.0, "fields": 1.0}
    assert reward("json")('{"x": 1}', example(None)).components == {"valid": 1.0}


def test_json_reward_errors_name_the_row():
    with pytest.raises(RewardError, match=r"t.jsonl, row 7: the answer is the gold JSON .* not JSON"):
        reward("json")('{"a": 1}', example("insulin"))
    with pytest.raises(RewardError, match=r"t.jsonl, row 7: invalid extras\['schema'\]: schema at \$: unknown type "
                                          r"'obj'"):
        reward("json")('{"a": 1}', example(None, {"schema": {"type": "obj"}}))
    with pytest.raises(RewardError, match="give weight 0 to every component this example has"):
        reward("json", weights={"schema": 1.0})('{"a": 1}', example(None))
    with pytest.raises(RecipeError, match=r"rewards\[0\] \(json\): weights: unknown component 'field'"):
        reward("json", weights={"field": 1.0})


def test_schema_subset():
    schema = {"type": "object", "required": ["n", "tags"], "properties": {
        "n": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
        "x": {"type": ["number", "null"]}}}
    assert schema_errors({"n": 3.0, "tags": ["a"], "x": None}, schema) == []
    assert schema_errors({"n": 3.5, "tags": ["a", "c"], "x": True}, schema) == [
        "$.n: expected integer, got float", "$.tags[1]: 'c' is not one of ['a', 'b']",
        "$.x: expected number or null, got bool"]
    assert schema_errors({"tags": []}, schema) == ["$: missing required property 'n'"]
    assert schema_errors([1], {"type": "dict"}) == ["$: expected dict, got list"]
    assert schema_errors(True, {"type": "integer"}) == ["$: expected integer, got bool"]


# ----------------------------------------------------------------------------------------------- format
def test_format_reward():
    fmt = reward("format")
    assert fmt("so \\boxed{5}", example(None)).components == {"match": 1.0}
    assert fmt("#### 5", example(None)).score == 1.0
    assert fmt("the answer is 5", example(None)).score == 0.0
    assert fmt("\\boxed{}", example(None)).score == 0.0                # an empty box shows no answer
    think = reward("format", pattern=r"<think>.*</think>", fullmatch=True, match_score=0.5, miss_score=-1.0)
    assert think("<think>hm</think>", example(None)).score == 0.5
    assert think("<think>hm</think> 5", example(None)).score == -1.0
    with pytest.raises(RecipeError, match=r"rewards\[0\] \(format\): pattern '\(' is not a valid regular expression"):
        reward("format", pattern="(")


# --------------------------------------------------------------------------------------------- registry
def test_registry_errors_are_recipe_errors_with_suggestions(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown reward 'mth'\. Did you mean 'math'\? Registered rewards: "
                                          r"exact_match, format, json, math"):
        validate_reward_terms([RewardTerm("mth")])
    with pytest.raises(RecipeError, match=r"unknown key 'rewards\[0\]\.params \(exact_match\)\.extrct'\. Did you "
                                          r"mean 'extract'\?"):
        validate_reward_terms([{"name": "exact_match", "params": {"extrct": False}}])
    with pytest.raises(RecipeError, match=r"unknown key 'rewards\[1\]\.wieght'\. Did you mean 'weight'\?"):
        validate_reward_terms([{"name": "math"}, {"name": "format", "wieght": 2}])
    with pytest.raises(RecipeError, match=r"rewards\[0\] \(format\): weight must be a finite number"):
        validate_reward_terms([RewardTerm("format", weight=math.nan)])
    with pytest.raises(RecipeError, match=r"rewards\[1\]: the name 'format' is already used by rewards\[0\]; give "
                                          r"one of them a `label`"):
        validate_reward_terms([RewardTerm("format"), RewardTerm("format", params={"pattern": "x"})])
    validate_reward_terms([RewardTerm("format"), RewardTerm("format", params={"pattern": "x"}, label="x")])
    with pytest.raises(RecipeError, match="give at least one reward"):
        validate_reward_terms([])


def test_user_reward_references(tmp_path):
    directory = write_module(tmp_path / "mods", "ref_rewards", """
        from posttrain.rewards import RewardFunction

        NOT_CALLABLE = 3

        def length(completion, example, scale=1.0):
            return scale * len(completion)

        class NotAReward:
            pass
    """)
    write_module(directory, "broken_rewards", "import no_such_module_anywhere\n")
    assert build_reward_function(RewardTerm("ref_rewards:length", params={"scale": 0.5}), 0, [directory])(
        "abcd", example(None)).score == 2.0
    cases = [
        ("broken_rewards:f", {}, r"cannot import module 'broken_rewards' \(ModuleNotFoundError: No module named "
                                 r"'no_such_module_anywhere'\)"),
        ("ref_rewards:lenght", {}, r"module 'ref_rewards' has no attribute 'lenght'\. Did you mean 'length'\?"),
        ("ref_rewards:NOT_CALLABLE", {}, r"is a int, not a function or RewardFunction class"),
        ("ref_rewards:NotAReward", {}, r"is a class but not a subclass of posttrain.rewards.RewardFunction"),
        ("ref_rewards:length", {"scal": 2}, r"rewards\[0\] \(ref_rewards:length\): the function cannot be called as "
                                            r"fn\(completion, example, scal=\.\.\.\)"),
    ]
    for name, params, message in cases:
        with pytest.raises(RecipeError, match=message):
            validate_reward_terms([RewardTerm(name, params=params)], [directory])


def test_user_function_return_values(tmp_path):
    directory = write_module(tmp_path / "mods", "returns_rewards", """
        import math
        from posttrain.rewards import RewardResult

        def as_dict(completion, example):
            return {"a": 0.25, "b": True}

        def as_dict_with_score(completion, example):
            return {"score": 2.0, "a": 0.25}

        def as_result(completion, example):
            return RewardResult(0.5, "42", {"part": 1})

        def as_text(completion, example):
            return "1.0"

        def as_nan(completion, example):
            return {"a": math.nan}
    """)

    def call(name):
        return build_reward_function(RewardTerm(f"returns_rewards:{name}"), 0, [directory])("c", example(None))

    assert call("as_dict") == RewardResult(1.25, None, {"a": 0.25, "b": 1.0})
    assert call("as_dict_with_score") == RewardResult(2.0, None, {"a": 0.25})
    assert call("as_result") == RewardResult(0.5, "42", {"part": 1.0})
    with pytest.raises(RewardError, match=r"reward 'returns_rewards:as_text' returned str '1.0'; a reward returns a "
                                          r"float"):
        call("as_text")
    with pytest.raises(RewardError, match=r"entry 'a' of the returned dict must be finite, got nan"):
        call("as_nan")


def test_register_reward_rejects_a_taken_name_and_plain_functions():
    with pytest.raises(ValueError, match="a reward named 'math' is already registered"):
        register_reward("math")(type("OtherMath", (RewardFunction,), {}))
    with pytest.raises(TypeError, match="decorates a RewardFunction subclass"):
        register_reward("plain")(lambda completion, example: 1.0)
    assert "plain" not in REWARDS


def test_a_reward_defined_in_main_runs_inline_but_not_in_workers():
    def call(self, completion, example):
        return RewardResult(1.0)

    register_reward("in_main")(type("InMain", (RewardFunction,), {"__module__": "__main__", "__call__": call}))
    try:
        with pytest.raises(RecipeError, match=r"rewards\[0\] \(__main__:InMain\) is defined in the script being run"):
            build_reward_set([RewardTerm("in_main")], num_workers=1)
        with build_reward_set([RewardTerm("in_main")], num_workers=0) as rewards:
            assert rewards.score(["x"], [example(None)])[0].score == 1.0
    finally:
        REWARDS.pop("in_main")


# ------------------------------------------------------------------------------------ combination + pool
PROBE = """
    import os
    import sys
    import time

    def probe(completion, example):
        if completion == "hang":
            time.sleep(1000)
        if completion == "boom":
            raise ZeroDivisionError("the user's bug")
        if completion == "die":
            os._exit(3)
        return {"torch_loaded": float("torch" in sys.modules), "length": float(len(completion))}
"""


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    return write_module(tmp_path_factory.mktemp("probe"), "probe_rewards", PROBE)


def test_weighted_combination_reports_every_component():
    terms = [RewardTerm("math"), RewardTerm("format", weight=0.5), RewardTerm("exact_match", weight=-0.25)]
    e = example("72")
    with build_reward_set(terms, num_workers=0) as rewards:
        assert rewards.names == ["math", "math/correct", "math/timeout", "format", "format/match", "format/timeout",
                                 "exact_match", "exact_match/correct", "exact_match/timeout"]
        right, unformatted, wrong = rewards.score(["so #### 72", "it is 72", "#### 71"], [e, e, e])
    assert right.score == pytest.approx(1.0 + 0.5 - 0.25) and right.answer == "72"
    assert unformatted.score == pytest.approx(1.0 - 0.25)
    assert wrong.score == 0.5 and wrong.answer == "71"
    assert right.components == {"math": 1.0, "math/correct": 1.0, "math/timeout": 0.0, "format": 1.0,
                                "format/match": 1.0, "format/timeout": 0.0, "exact_match": 1.0,
                                "exact_match/correct": 1.0, "exact_match/timeout": 0.0}


def test_answer_is_the_first_terms_non_none_answer():
    with build_reward_set([RewardTerm("format"), RewardTerm("exact_match", params={"extract": False}),
                           RewardTerm("math")], num_workers=0) as rewards:
        (result,) = rewards.score(["#### 5"], [example("5")])
    assert result.answer == "#### 5"        # format has none; exact_match's is the whole completion


def test_pool_scores_in_workers_that_never_import_torch(probe_dir):
    e = example("4")
    with build_reward_set([RewardTerm("probe_rewards:probe", weight=2.0), RewardTerm("math")], num_workers=2,
                          timeout_s=5.0, search_dirs=[probe_dir]) as rewards:
        results = rewards.score(["\\boxed{4}", "5", "#### 4"], [e, e, e])
        assert rewards.names[:2] == ["probe_rewards:probe", "probe_rewards:probe/timeout"]
        assert rewards.names[-2:] == ["probe_rewards:probe/torch_loaded", "probe_rewards:probe/length"]
    assert [r.components["probe_rewards:probe/torch_loaded"] for r in results] == [0.0, 0.0, 0.0]
    assert [r.score for r in results] == [2 * 9 + 1, 2 * 1 + 0, 2 * 6 + 1]
    assert [r.answer for r in results] == ["4", "5", "4"]     # the probe gives none: math's


def test_a_hung_call_times_out_at_the_limit_and_the_pool_recovers(probe_dir):
    e = example(None)
    with build_reward_set([RewardTerm("probe_rewards:probe"), RewardTerm("format")], num_workers=2, timeout_s=1.0,
                          search_dirs=[probe_dir]) as rewards:
        rewards.score(["warm", "up"], [e, e])            # the workers are started and ready
        started = time.monotonic()
        results = rewards.score(["a", "hang", "#### 1", "bcd"], [e] * 4)
        elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < 3.0, elapsed
        assert rewards.timeouts == 1
        hung = results[1]
        assert hung.score == 0.0 and hung.components["probe_rewards:probe/timeout"] == 1.0
        assert hung.components["probe_rewards:probe"] == 0.0 and hung.components["format/timeout"] == 0.0
        assert [r.components["probe_rewards:probe"] for r in results] == [1.0, 0.0, 6.0, 3.0]
        assert results[2].score == 7.0 and results[2].components["format/match"] == 1.0
        assert all(r.components["probe_rewards:probe/timeout"] == 0.0 for i, r in enumerate(results) if i != 1)
        again = rewards.score(["abcdef", "hang", "xy"], [e] * 3)         # a fresh worker replaced the killed one
        assert [r.components["probe_rewards:probe"] for r in again] == [6.0, 0.0, 2.0] and rewards.timeouts == 2


def test_a_raising_user_reward_names_the_reward_the_row_and_the_error(probe_dir):
    rows = [example(None, row=1), PromptExample("p", None, "data/train.jsonl", 12)]
    with build_reward_set([RewardTerm("probe_rewards:probe", label="probe")], num_workers=1, timeout_s=5.0,
                          search_dirs=[probe_dir]) as rewards:
        with pytest.raises(RewardError) as err:
            rewards.score(["fine", "boom"], rows)
        message = str(err.value)
        assert message.startswith("reward 'probe' failed on data/train.jsonl, row 12 (completion 'boom'): "
                                  "ZeroDivisionError: the user's bug (raised at ")
        assert re.search(r"probe_rewards\.py:\d+, in probe\)$", message)
        with pytest.raises(RewardError, match=r"reward 'probe' failed on t.jsonl, row 1 .*the reward worker process "
                                              r"died \(exit code 3\)"):
            rewards.score(["die"], rows[:1])
        assert rewards.score(["ok"], rows[:1])[0].score == 2.0     # still working afterwards


def test_a_reward_module_that_fails_in_the_workers_is_reported_at_the_first_batch(tmp_path):
    directory = write_module(tmp_path / "mods", "parent_only_rewards", """
        import multiprocessing

        if multiprocessing.parent_process() is not None:
            raise RuntimeError("this module refuses to load in a worker")

        def one(completion, example):
            return 1.0
    """)
    rewards = build_reward_set([RewardTerm("parent_only_rewards:one")], num_workers=1, search_dirs=[directory])
    with pytest.raises(RewardError, match=r"reward worker process: cannot build the rewards: reward "
                                          r"'parent_only_rewards:one': cannot import module .*RuntimeError: this "
                                          r"module refuses to load in a worker"):
        rewards.score(["x"], [example(None)])
    with pytest.raises(RewardError, match="the reward pool is closed"):
        rewards.score(["x"], [example(None)])


def test_inline_mode_interrupts_a_hung_call_in_the_main_thread(probe_dir):
    e = example(None)
    with build_reward_set([RewardTerm("probe_rewards:probe")], num_workers=0, timeout_s=0.5,
                          search_dirs=[probe_dir]) as rewards:
        started = time.monotonic()
        results = rewards.score(["hang", "ab"], [e, e])
        assert time.monotonic() - started < 2.0
        assert [r.components["probe_rewards:probe/timeout"] for r in results] == [1.0, 0.0]
        assert results[1].components["probe_rewards:probe/length"] == 2.0 and rewards.timeouts == 1
        with pytest.raises(RewardError, match=r"reward 'probe_rewards:probe' failed on t.jsonl, row 7 \(completion "
                                              r"'boom'\): ZeroDivisionError"):
            rewards.score(["boom"], [e])


def test_a_reward_registered_by_a_user_module_resolves_in_the_workers(tmp_path):
    import importlib
    import sys

    directory = write_module(tmp_path / "mods", "registered_rewards", """
        from posttrain.rewards import RewardFunction, RewardResult, register_reward

        @register_reward("shout")
        class Shout(RewardFunction):
            components = ("upper",)

            def __call__(self, completion, example):
                upper = float(completion.isupper())
                return RewardResult(upper, None, {"upper": upper})
    """)
    sys.path.insert(0, str(directory))
    try:
        importlib.import_module("registered_rewards")
        with build_reward_set([RewardTerm("shout")], num_workers=1, timeout_s=5.0) as rewards:
            results = rewards.score(["HEY", "hey"], [example(None)] * 2)
        assert [r.components for r in results] == [{"shout": 1.0, "shout/upper": 1.0, "shout/timeout": 0.0},
                                                    {"shout": 0.0, "shout/upper": 0.0, "shout/timeout": 0.0}]
    finally:
        REWARDS.pop("shout", None)
        sys.path.remove(str(directory))


def test_pool_settings_are_checked():
    with pytest.raises(RecipeError, match="num_workers must be an integer >= 0"):
        build_reward_set([RewardTerm("format")], num_workers=-1)
    with pytest.raises(RecipeError, match="timeout_s must be a positive number"):
        build_reward_set([RewardTerm("format")], timeout_s=0)


# ------------------------------------------------------------------------------------------------- docs
def _doc_blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", (ROOT / "docs" / "rewards.md").read_text(), flags=re.S)


def test_the_documented_user_reward_runs_from_its_recipe_section(tmp_path):
    (tmp_path / "my_rewards.py").write_text(_doc_blocks("python")[0])
    (section,) = [yaml.safe_load(block) for block in _doc_blocks("yaml") if "my_rewards:" in block]
    examples, _ = load_prompt_examples(str(GSM8K), limit=2)
    natalia = examples[0]
    with build_reward_set(section["rewards"], num_workers=1, timeout_s=5.0, search_dirs=[tmp_path]) as rewards:
        assert rewards.names == ["math", "math/correct", "math/timeout", "think", "think/timeout"]
        thought, bare, wrong = rewards.score([
            "<think>\nMay: 48/2 = 24. Total: 48 + 24.\n</think>\n#### 72",
            "#### 72",
            "<think>\nMay: 48/2 = 24.\n</think>\n#### 24",
        ], [natalia] * 3)
    assert thought.components == {"math": 1.0, "math/correct": 1.0, "math/timeout": 0.0, "think": 1.5,
                                  "think/think": 1.0, "think/answer": 0.5, "think/timeout": 0.0}
    assert thought.score == pytest.approx(1.0 + 0.2 * 1.5)
    assert bare.score == 1.0 and bare.components["think"] == 0.0
    assert wrong.score == pytest.approx(0.2 * 1.5) and wrong.answer == "24"
