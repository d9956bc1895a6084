"""Prompt data for online RL: the real GSM8K, MATH-500 and One-Shot-RLVR files, every format and container,
and bad files that must stop with the file, the row and the field."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SHARED_DATA
from posttrain.data.prompts import PromptExample, detect_prompt_format, load_prompt_examples
from posttrain.errors import DataError, RecipeError

GSM8K = SHARED_DATA / "gsm8k" / "train.jsonl"
PI1 = SHARED_DATA / "one-shot-rlvr" / "pi1_r128.parquet"
DSR = SHARED_DATA / "one-shot-rlvr" / "dsr_sub.parquet"
MATH500 = SHARED_DATA / "holdout" / "math500" / "test.jsonl"  # read only to test the loader


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def posttrain_log(caplog):
    logger = logging.getLogger("posttrain")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="posttrain")
    yield caplog
    logger.removeHandler(caplog.handler)


# ------------------------------------------------------------------------------------------------ real files
def test_gsm8k_train_reads_every_row_with_the_final_answer():
    examples, skipped = load_prompt_examples(str(GSM8K))
    assert len(examples) == 7473 and skipped == 0
    first = examples[0]
    assert first.prompt.startswith("Natalia sold clips to 48 of her friends in April")
    assert first.answer == "72" and first.row == 1 and first.source == str(GSM8K)
    assert first.extras["solution"].endswith("#### 72") and "<<48/2=24>>" in first.extras["solution"]
    assert examples[1].answer == "10"
    # every final answer is a bare number: commas and spaces removed from "#### 1,000"-style answers
    assert all(e.answer.lstrip("-").replace(".", "", 1).isdigit() for e in examples)
    with_commas = [e for e in examples if "," in e.extras["solution"].rsplit("####", 1)[1]]
    assert with_commas and all("," not in e.answer for e in with_commas)


def test_gsm8k_start_and_limit_select_valid_rows_in_file_order():
    examples, _ = load_prompt_examples(str(GSM8K), start=5, limit=3)
    assert [e.row for e in examples] == [6, 7, 8]


def test_one_shot_rlvr_pi1_reads_128_copies_of_one_chat_prompt():
    examples, skipped = load_prompt_examples(str(PI1))
    assert len(examples) == 128 and skipped == 0
    assert {e.answer for e in examples} == {"12.8"}
    prompt = examples[0].prompt
    assert isinstance(prompt, list) and prompt[0]["role"] == "user" and "wind" in prompt[0]["content"]
    assert examples[0].extras["data_source"] == "deepscaler"
    assert examples[0].extras["reward_model"] == {"style": "rule"}


def test_dsr_sub_row_266_has_no_answer_and_is_reported():
    with pytest.raises(DataError) as err:
        load_prompt_examples(str(DSR))
    message = str(err.value)
    assert f"{DSR}, row 266, field 'reward_model.ground_truth': empty answer" in message
    assert "invalid_rows: skip" in message


def test_dsr_sub_with_skip_counts_logs_and_writes_the_skipped_row(tmp_path, posttrain_log):
    skipped_path = tmp_path / "run" / "skipped_rows.jsonl"
    examples, skipped = load_prompt_examples(str(DSR), invalid_rows="skip", skipped_path=skipped_path,
                                             what="data.train")
    assert len(examples) == 1208 and skipped == 1
    assert 266 not in {e.row for e in examples} and examples[265].row == 267
    assert examples[0].answer == "\\frac{3}{7}"
    lines = [json.loads(line) for line in skipped_path.read_text().splitlines()]
    assert lines == [{"split": "data.train", "source": str(DSR), "row": 266, "field": "reward_model.ground_truth",
                      "reason": "empty answer"}]
    assert "data.train: skipped 1 invalid rows" in posttrain_log.text


def test_math500_reads_latex_answers_and_keeps_level_in_extras():
    examples, skipped = load_prompt_examples(str(MATH500))
    assert len(examples) == 500 and skipped == 0
    first = examples[0]
    assert first.prompt.startswith("Convert the point $(0,3)$")
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert {"solution", "level", "subject", "unique_id"} <= set(first.extras)
    assert {e.extras["level"] for e in examples} == {1, 2, 3, 4, 5}


def test_detection_by_first_row_fields():
    assert detect_prompt_format({"question": "q", "answer": "#### 1"}, "f") == "gsm8k"
    assert detect_prompt_format({"problem": "p", "answer": "1"}, "f") == "math"
    assert detect_prompt_format({"prompt": [], "reward_model": {}}, "f") == "rl"
    assert detect_prompt_format({"prompt": "p"}, "f") == "prompt_answer"


# ------------------------------------------------------------------------------------ formats and containers
@pytest.mark.parametrize("container", ["jsonl", "json", "parquet"])
def test_prompt_answer_in_every_container_with_answer_aliases(tmp_path, container):
    records = [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}],
         "answer": "5", "topic": "sums"},
        {"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2", "topic": "sums"},
        {"prompt": [{"role": "user", "content": "Name a colour."}], "answer": None, "topic": "open"},
    ]  # parquet columns hold one type: chat prompts throughout (text prompts: the other tests)
    path = tmp_path / f"p.{container}"
    if container == "jsonl":
        write_jsonl(path, records)
    elif container == "json":
        path.write_text(json.dumps(records), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    examples, skipped = load_prompt_examples(str(path))
    assert skipped == 0
    assert [e.answer for e in examples] == ["5", "2", None]
    assert examples[1].prompt == [{"role": "user", "content": "What is 1 + 1?"}]
    assert examples[0].extras == {"topic": "sums"} and examples[2].row == 3


@pytest.mark.parametrize("alias", ["ground_truth", "solution"])
def test_prompt_answer_aliases_and_json_gold(tmp_path, alias):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", alias: "42", "schema": {"type": "object"}},
                                              {"prompt": "q", alias: {"drug": "insulin"}}])
    examples, _ = load_prompt_examples(str(path))
    kept = {"schema": {"type": "object"}, **({"solution": "42"} if alias == "solution" else {})}
    assert examples[0].answer == "42" and examples[0].extras == kept  # a solution also stays one (HPT's gold)
    assert json.loads(examples[1].answer) == {"drug": "insulin"}


def test_numbers_as_answers_are_read_as_text(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "answer": 12}, {"problem": "q", "answer": 0.5}])
    assert [e.answer for e in load_prompt_examples(str(path))[0]] == ["12", "0.5"]


def test_forced_format_reports_missing_fields(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "answer": "#### 3"}])
    with pytest.raises(DataError, match=r"g.jsonl, row 1, field 'question': missing field \(the row has fields "
                                        r"\['answer', 'prompt'\]\)"):
        load_prompt_examples(str(path), fmt="gsm8k")
    with pytest.raises(RecipeError, match=r"unknown prompt format 'gsm8'\. Did you mean 'gsm8k'\?"):
        load_prompt_examples(str(path), fmt="gsm8")


def test_builtin_arithmetic_prompts_carry_the_sum_as_answer():
    examples, skipped = load_prompt_examples("builtin:arithmetic", split="heldout", limit=20)
    assert skipped == 0 and len(examples) == 20
    for e in examples:
        assert e.source == "builtin:arithmetic/heldout"
        assert int(e.answer) == e.extras["a"] + e.extras["b"]
        assert e.prompt == f"What is {e.extras['a']} + {e.extras['b']}?"


# ------------------------------------------------------------------------------------------------ bad files
def test_corrupt_json_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: invalid JSON"):
        load_prompt_examples(str(path))


def test_wrong_field_names_say_which_formats_exist(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", [{"query": "q", "target": "1"}])
    with pytest.raises(DataError, match=r"w.jsonl, row 1: cannot tell the prompt format from fields "
                                        r"\['query', 'target'\].*set `format:`"):
        load_prompt_examples(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.jsonl: the data set is empty"):
        load_prompt_examples(str(path))


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    first, second = '{"prompt": "a", "answer": "1"}\n', '{"prompt": "caf\u00e9", "answer": "2"}\n'
    path.write_bytes((first + second).encode("latin-1"))
    offset = len(first) + second.index("\u00e9")
    with pytest.raises(DataError, match=rf"latin1.jsonl: not UTF-8 text \(invalid byte at offset {offset}, line 2\)"):
        load_prompt_examples(str(path))


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_prompt_examples(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("record, field, reason", [
    ({"question": "   ", "answer": "x #### 3"}, "question", "empty prompt"),
    ({"question": "q", "answer": "no marker"}, "answer", "no '####' before the final answer"),
    ({"question": "q", "answer": "x ####  "}, "answer", "empty final answer after '####'"),
    ({"question": ["q"], "answer": "#### 1"}, "question", "must be a string or a list of {role, content} messages"),
])
def test_invalid_gsm8k_rows(tmp_path, record, field, reason):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "ok", "answer": "#### 1"}, record])
    with pytest.raises(DataError) as err:
        load_prompt_examples(str(path))
    assert f"g.jsonl, row 2, field {field!r}: {reason}" in str(err.value)


@pytest.mark.parametrize("record, field, reason", [
    ({"prompt": [], "answer": "1"}, "prompt", "empty prompt (no messages)"),
    ({"prompt": [{"role": "user", "content": 3}], "answer": "1"}, "prompt", "message 1: content must be a string"),
    ({"prompt": "p", "answer": ""}, "answer", "empty answer"),
    ({"prompt": "p", "answer": True}, "answer", "must be a string or a number"),
    ("just text", "(row)", "expected a JSON object, got str"),
])
def test_invalid_prompt_answer_rows_skip_or_error(tmp_path, record, field, reason):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "answer": "1"}, record])
    with pytest.raises(DataError, match="invalid row in prompt data"):
        load_prompt_examples(str(path))
    examples, skipped = load_prompt_examples(str(path), invalid_rows="skip", skipped_path=tmp_path / "s.jsonl")
    assert [e.row for e in examples] == [1] and skipped == 1
    line = json.loads((tmp_path / "s.jsonl").read_text())
    assert (line["row"], line["field"]) == (2, field) and line["reason"].startswith(reason)


def test_rl_rows_without_reward_model_ground_truth(tmp_path):
    path = tmp_path / "rl.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": [{"role": "user", "content": "a"}], "reward_model": {"ground_truth": "1", "style": "rule"}},
        {"prompt": [{"role": "user", "content": "b"}], "reward_model": {"ground_truth": None, "style": "rule"}},
    ]), path)
    with pytest.raises(DataError, match=r"rl.parquet, row 2, field 'reward_model.ground_truth': missing answer"):
        load_prompt_examples(str(path))


def test_all_rows_invalid_with_skip_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "", "answer": "1"}] * 2)
    with pytest.raises(DataError, match=r"no usable prompts in .*p.jsonl \(2 invalid rows"):
        load_prompt_examples(str(path), invalid_rows="skip")


def test_bad_policy_and_window():
    with pytest.raises(RecipeError, match="invalid_rows must be 'error' or 'skip'"):
        load_prompt_examples(str(GSM8K), invalid_rows="drop")
    with pytest.raises(RecipeError, match="start must be >= 0"):
        load_prompt_examples(str(GSM8K), start=-1)


def test_prompt_example_is_the_rewards_contract_type():
    from posttrain.rewards import PromptExample as RewardsPromptExample

    assert PromptExample is RewardsPromptExample
