"""The data layer: readers for every supported file format and preference format, row-level validation
with the `error` / `skip` policies, real HH-RLHF data, the tokenisation contract, the built-in tasks and
collation."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SHARED_DATA
from posttrain.config import DataConfig, DataSource
from posttrain.data.layout import build_pair_rows
from posttrain.data.readers import HH_SPLIT, PreferenceRow, handle_invalid, load_preference_rows
from posttrain.data.sources import load_pairs
from posttrain.data.tasks import builtin_rows, wrong_sum
from posttrain.data.tokenize import TokenizedPair, hh_to_messages, render_prompt, tokenize_pairs
from posttrain.errors import DataError, RecipeError

HH_HELPFUL = SHARED_DATA / "hh-rlhf" / "helpful-base" / "test.jsonl"


# ---------------------------------------------------------------------------------------------- helpers
def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path, records):
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_dataset_dir(path, records):
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


WRITERS = {"jsonl": (write_jsonl, "pairs.jsonl"), "json": (write_json, "pairs.json"),
           "parquet": (write_parquet, "pairs.parquet"), "datasets": (write_dataset_dir, "pairs_ds")}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


STRING_RECORDS = [
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Lyon.", "id": 7},
    {"prompt": "Name a prime number.", "chosen": " 7", "rejected": " 8", "id": 8},
]
CHAT_RECORDS = [
    {"prompt": [user("Hi"), assistant("Hello!"), user("Capital of France?")],
     "chosen": [assistant("Paris.")], "rejected": [assistant("Lyon.")]},
    {"prompt": [user("A prime?")], "chosen": [assistant("7")], "rejected": [assistant("8")]},
]
IMPLICIT_RECORDS = [
    {"chosen": [user("Capital of France?"), assistant("Paris.")],
     "rejected": [user("Capital of France?"), assistant("Lyon.")]},
    {"chosen": [user("Hi"), assistant("Hello!"), user("A prime?"), assistant("7")],
     "rejected": [user("Hi"), assistant("Hello!"), user("A prime?"), assistant("8")]},
]
EXPECTED = {
    "string": [("What is the capital of France?", " Paris.", " Lyon."), ("Name a prime number.", " 7", " 8")],
    "chat": [([user("Hi"), assistant("Hello!"), user("Capital of France?")], "Paris.", "Lyon."),
             ([user("A prime?")], "7", "8")],
    "implicit": [([user("Capital of France?")], "Paris.", "Lyon."),
                 ([user("Hi"), assistant("Hello!"), user("A prime?")], "7", "8")],
}
RECORDS = {"string": STRING_RECORDS, "chat": CHAT_RECORDS, "implicit": IMPLICIT_RECORDS}


def hh(*turns):
    """An HH-RLHF dialogue from alternating Human/Assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def skip_cfg(**kw):
    return DataConfig(invalid_rows="skip", **kw)


@pytest.fixture
def posttrain_log(caplog):
    """The posttrain logger does not propagate; attach pytest's capture handler to it."""
    logger = logging.getLogger("posttrain")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="posttrain")
    yield caplog
    logger.removeHandler(caplog.handler)


# ---------------------------------------------------------------------------------------------- readers
@pytest.mark.parametrize("kind", ["string", "chat", "implicit"])
@pytest.mark.parametrize("container", ["jsonl", "json", "parquet", "datasets"])
def test_reader_reads_trl_formats_from_every_container(tmp_path, container, kind):
    writer, name = WRITERS[container]
    path = writer(tmp_path / name, RECORDS[kind])
    rows, invalid = load_preference_rows(str(path))
    assert invalid == []
    assert [(r.prompt, r.chosen, r.rejected) for r in rows] == EXPECTED[kind]
    assert [r.row for r in rows] == [1, 2]
    assert all(r.source == str(path) for r in rows)
    if kind == "string":
        assert [r.extras for r in rows] == [{"id": 7}, {"id": 8}]


def test_reader_hh_splits_at_last_assistant_turn(tmp_path):
    chosen = hh("Hi", "Hello, how can I help?", "Capital of France?", "Paris.")
    rejected = hh("Hi", "Hello, how can I help?", "Capital of France?", "Lyon, I think.")
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    rows, invalid = load_preference_rows(str(path))
    assert invalid == []
    (row,) = rows
    assert row.prompt == hh("Hi", "Hello, how can I help?", "Capital of France?") + HH_SPLIT
    assert row.chosen == " Paris."
    assert row.rejected == " Lyon, I think."
    assert row.prompt + row.chosen == chosen and row.prompt + row.rejected == rejected
    # the same file with the format forced gives the same rows; forcing trl instead reports the missing prompt
    assert load_preference_rows(str(path), fmt="hh")[0] == rows
    assert [i.field for i in load_preference_rows(str(path), fmt="trl")[1]] == ["prompt"]


def test_reader_datasets_dict_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(STRING_RECORDS),
                               "test": datasets.Dataset.from_list(STRING_RECORDS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_preference_rows(str(tmp_path / "dd"))[0]) == 2
    assert len(load_preference_rows(str(tmp_path / "dd"), split="test")[0]) == 1
    with pytest.raises(DataError, match="validation"):
        load_preference_rows(str(tmp_path / "dd"), split="validation")
    (tmp_path / "not_ds").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_preference_rows(str(tmp_path / "not_ds"))


def test_reader_json_array_row_numbers_and_blank_jsonl_lines(tmp_path):
    bad = {"prompt": "p", "chosen": "same", "rejected": "same"}
    rows, invalid = load_preference_rows(str(write_json(tmp_path / "a.json", [STRING_RECORDS[0], bad])))
    assert len(rows) == 1 and [(i.row, i.field) for i in invalid] == [(2, "rejected")]
    # JSONL: the row number is the file's line number, blank lines included
    path = tmp_path / "b.jsonl"
    path.write_text("\n" + json.dumps(STRING_RECORDS[0]) + "\n\n" + json.dumps(bad) + "\n", encoding="utf-8")
    rows, invalid = load_preference_rows(str(path))
    assert [r.row for r in rows] == [2] and [i.row for i in invalid] == [4]


def test_reader_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    # JSON allows U+2028, U+0085 and form feeds unescaped in strings; they are not line breaks of JSON Lines
    record = {"prompt": "a\u2028b\x85c\x0cd", "chosen": "x\u2029y", "rejected": "z"}
    path = write_jsonl(tmp_path / "u.jsonl", [record, STRING_RECORDS[1]])
    rows, invalid = load_preference_rows(str(path))
    assert invalid == []
    assert [(r.prompt, r.chosen, r.row) for r in rows] == [("a\u2028b\x85c\x0cd", "x\u2029y", 1),
                                                          ("Name a prime number.", " 7", 2)]


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_reader_accepts_utf8_byte_order_mark(tmp_path, suffix):
    path = tmp_path / f"bom.{suffix}"
    body = json.dumps(STRING_RECORDS) if suffix == "json" else json.dumps(STRING_RECORDS[0]) + "\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    rows, invalid = load_preference_rows(str(path))
    assert invalid == [] and rows[0].prompt == "What is the capital of France?"


# ---------------------------------------------------------------------------------------------- validation
BAD_ROWS = [
    # (record, field, reason pattern)
    ({"prompt": "p", "chosen": "c"}, "rejected", "missing field"),
    ({"prompt": "p", "rejected": "r"}, "chosen", "missing field"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, "rejected", "missing field"),
    ({"prompt": "p", "chosen": "  \n", "rejected": "r"}, "chosen", "empty response"),
    ({"prompt": "p", "chosen": "c", "rejected": ""}, "rejected", "empty response"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    ({"prompt": "p", "chosen": " same", "rejected": "same\n"}, "rejected", "identical"),
    ({"prompt": " ", "chosen": "c", "rejected": "r"}, "prompt", "empty prompt"),
    ({"prompt": [], "chosen": "c", "rejected": "r"}, "prompt", "empty prompt"),
    ({"prompt": 5, "chosen": "c", "rejected": "r"}, "prompt", "string or a list"),
    ({"prompt": "p", "chosen": [user("c")], "rejected": "r"}, "chosen", "assistant message"),
    ({"chosen": [user("q"), assistant("c")], "rejected": [user("other q"), assistant("r")]}, "prompt", "differs"),
    ({"chosen": "c", "rejected": "r"}, "prompt", "missing field"),
]


@pytest.mark.parametrize("record,field,reason", BAD_ROWS)
def test_invalid_trl_row_reported_with_row_and_field(tmp_path, record, field, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [STRING_RECORDS[0], record, STRING_RECORDS[1]])
    rows, invalid = load_preference_rows(str(path))
    assert [r.row for r in rows] == [1, 3]
    (bad,) = invalid
    assert (bad.source, bad.row, bad.field) == (str(path), 2, field)
    assert re.search(reason, bad.reason)


HH_OK = {"chosen": hh("Q?", "Good answer."), "rejected": hh("Q?", "Bad answer.")}
BAD_HH = [
    ({"chosen": hh("Q?", "A."), "rejected": hh("Q?", "A.")}, "rejected", "identical"),
    ({"chosen": hh("Q?", "A."), "rejected": hh("Q?") + HH_SPLIT}, "rejected", "empty response"),
    ({"chosen": hh("Q?", "A."), "rejected": hh("Other Q?", "B.")}, "prompt", "differs"),
    ({"chosen": hh("Q?", "A.")}, "rejected", "missing field"),
    ({"chosen": hh("Q?", "A."), "rejected": "\n\nHuman: Q? no turn"}, "rejected", "no '\\\\n\\\\nAssistant:'"),
]


@pytest.mark.parametrize("record,field,reason", BAD_HH)
def test_invalid_hh_row_reported_with_row_and_field(tmp_path, record, field, reason):
    path = write_jsonl(tmp_path / "hh.jsonl", [HH_OK, record])
    rows, invalid = load_preference_rows(str(path))
    assert len(rows) == 1
    (bad,) = invalid
    assert (bad.source, bad.row, bad.field) == (str(path), 2, field)
    assert re.search(reason, bad.reason), bad.reason


def test_first_row_missing_field_is_an_invalid_row_not_a_format_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c"}, STRING_RECORDS[0]])
    rows, invalid = load_preference_rows(str(path))
    assert len(rows) == 1 and [(i.row, i.field) for i in invalid] == [(1, "rejected")]
    assert "prompt" in invalid[0].reason and "chosen" in invalid[0].reason  # names the fields the row has
    # the same for raw HH-RLHF whose first row lacks `rejected`
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": hh("Q?", "A.")}, HH_OK])
    rows, invalid = load_preference_rows(str(path))
    assert [r.chosen for r in rows] == [" Good answer."] and [(i.row, i.field) for i in invalid] == [(1, "rejected")]


def test_non_object_rows_are_invalid_rows_with_their_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n[1, 2]\n" + json.dumps(STRING_RECORDS[0]) + "\n\"text\"\n", encoding="utf-8")
    rows, invalid = load_preference_rows(str(path))
    assert [r.row for r in rows] == [3]
    assert [(i.row, i.field) for i in invalid] == [(2, "(row)"), (4, "(row)")]


def test_error_policy_raises_naming_file_row_and_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [STRING_RECORDS[0], STRING_RECORDS[1],
                                              {"prompt": "p", "chosen": "c", "rejected": ""},
                                              {"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError) as info:
        load_pairs(DataSource(path=str(path)), DataConfig(), tokenizer, skipped_log=tmp_path / "skipped.jsonl")
    message = str(info.value)
    assert str(path) in message and "row 3" in message and "'rejected'" in message and "empty response" in message
    assert "1 more" in message and "invalid_rows: skip" in message
    assert not (tmp_path / "skipped.jsonl").exists()


def test_skip_policy_counts_logs_and_writes_skipped_rows(tmp_path, tokenizer, posttrain_log):
    records = [STRING_RECORDS[0], {"prompt": "p", "chosen": "c"}, STRING_RECORDS[1],
               {"prompt": "p", "chosen": "same", "rejected": "same"},
               {"chosen": [user("q"), assistant("c")], "rejected": [user("other"), assistant("r")]}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    log = tmp_path / "run" / "skipped_rows.jsonl"
    pairs, stats, invalid = load_pairs(DataSource(path=str(path)), skip_cfg(), tokenizer, skipped_log=log)
    assert len(pairs) == stats.rows == 2 and [p.row for p in pairs] == [1, 3]
    assert [(i.row, i.field) for i in invalid] == [(2, "rejected"), (4, "rejected"), (5, "prompt")]
    written = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert [(w["source"], w["row"], w["field"]) for w in written] == [(str(path), 2, "rejected"),
                                                                      (str(path), 4, "rejected"),
                                                                      (str(path), 5, "prompt")]
    assert all(w["split"] == "data.train" and w["reason"] for w in written)
    text = posttrain_log.text
    assert "skipped 3 invalid rows" in text
    assert f"{path}, row 4, field 'rejected': chosen and rejected are identical" in text
    assert "2 pairs (3 skipped as invalid" in text


def test_skip_policy_all_rows_invalid_still_writes_skipped_log(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 2)
    log = tmp_path / "skipped_rows.jsonl"
    with pytest.raises(DataError, match="no usable pairs.*2 invalid rows"):
        load_pairs(DataSource(path=str(path)), skip_cfg(), tokenizer, skipped_log=log)
    assert [json.loads(line)["row"] for line in log.read_text().splitlines()] == [1, 2]


def test_handle_invalid_logs_more_than_twenty(posttrain_log):
    from posttrain.data.readers import InvalidRow

    handle_invalid([InvalidRow("f.jsonl", i, "chosen", "empty response") for i in range(1, 26)], "skip", "data.x")
    text = posttrain_log.text
    assert "data.x: skipped 25 invalid rows" in text and "row 20," in text and "row 21," not in text
    assert "and 5 more" in text
    handle_invalid([], "error", "data.x")  # nothing invalid: no error


def test_corrupt_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(STRING_RECORDS[0]) + "\n" + json.dumps(STRING_RECORDS[1]) + "\n"
                    + '{"prompt": "p", "chosen": "c", "rejected": \n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_preference_rows(str(path))
    assert str(path) in str(info.value) and "line 3" in str(info.value)


def test_corrupt_json_array_names_file_and_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"prompt": "p", "chosen": "c", "rejected": "r"},\n{"prompt": "p",,}\n]', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_preference_rows(str(path))
    assert str(path) in str(info.value) and "line 3" in str(info.value)


def test_corrupt_parquet_is_a_data_error(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="parquet"):
        load_preference_rows(str(path))


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(STRING_RECORDS[0]).encode() + b"\n"
                     + '{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as info:
        load_preference_rows(str(path))
    message = str(info.value)
    assert str(path) in message and "UTF-8" in message and "line 2" in message


def test_wrong_field_names_give_a_clear_message(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "response_j": "a", "response_k": "b"}])
    with pytest.raises(DataError) as info:
        load_preference_rows(str(path))
    message = str(info.value)
    assert str(path) in message and "row 1" in message
    assert "['question', 'response_j', 'response_k']" in message
    assert "prompt, chosen, rejected" in message


@pytest.mark.parametrize("content", ["", "\n\n  \n", "[]", "[ ]\n"])
def test_empty_data_set(tmp_path, content):
    for name in ("empty.jsonl", "empty.json"):
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(DataError, match="empty"):
            load_preference_rows(str(tmp_path / name))


def test_empty_parquet_and_missing_path(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "chosen": pa.array([], pa.string()),
                             "rejected": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match="empty"):
        load_preference_rows(str(tmp_path / "e.parquet"))
    with pytest.raises(DataError, match="does not exist"):
        load_preference_rows(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------------------------------------- real HH-RLHF
def _hh_invalid_rows_independently(path) -> set[int]:
    """Rows of a raw HH-RLHF file that cannot be a pair: identical dialogues, a prompt (everything before the
    last Assistant turn) that differs, or an empty response. Computed from the raw text, not with posttrain."""
    bad = set()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            record = json.loads(line)
            c, r = record["chosen"], record["rejected"]
            ci, ri = c.rfind(HH_SPLIT), r.rfind(HH_SPLIT)
            if (c == r or ci < 0 or ri < 0 or c[:ci] != r[:ri]
                    or not c[ci + len(HH_SPLIT):].strip() or not r[ri + len(HH_SPLIT):].strip()):
                bad.add(number)
    return bad


def test_real_hh_rlhf_helpful_base_with_skip(tmp_path, tokenizer):
    raw_lines = HH_HELPFUL.read_text(encoding="utf-8").splitlines()
    assert len(raw_lines) == 2354
    expected_bad = _hh_invalid_rows_independently(HH_HELPFUL)
    identical = sum(json.loads(line)["chosen"] == json.loads(line)["rejected"] for line in raw_lines)
    # Note: the shared README says 36 identical pairs; this file (helpful-base test) has 2 of them.
    assert identical >= 1 and len(expected_bad) > identical

    with pytest.raises(DataError, match=re.escape(str(HH_HELPFUL)) + r", row \d+, field "):
        load_pairs(DataSource(path=str(HH_HELPFUL)), DataConfig(template="plain"), tokenizer)

    log = tmp_path / "skipped_rows.jsonl"
    cfg = skip_cfg(template="plain", max_length=100_000)  # nothing untrainable: only data-invalid rows skipped
    pairs, stats, invalid = load_pairs(DataSource(path=str(HH_HELPFUL)), cfg, tokenizer, skipped_log=log)
    assert {i.row for i in invalid} == expected_bad
    assert len(invalid) == len(expected_bad)
    assert len(pairs) + len(invalid) == 2354 and stats.rows == len(pairs)
    assert sum(i.reason == "chosen and rejected are identical" for i in invalid) == identical
    assert len(log.read_text(encoding="utf-8").splitlines()) == len(invalid)
    assert stats.truncated == 0
    assert stats.boundary_merges == 0  # HH responses start with a space: no token crosses the prompt's end
    # every pair's completion ends with EOS and decodes back to the raw dialogue's last response
    by_row = {i + 1: json.loads(line) for i, line in enumerate(raw_lines)}
    for pair in pairs[::97]:
        record = by_row[pair.row]
        assert pair.chosen_ids[-1] == tokenizer.eos_token_id
        text = tokenizer.decode(pair.prompt_ids + pair.chosen_ids[:-1])
        assert text == record["chosen"]


# ---------------------------------------------------------------------------------------------- tokenisation
TOKENIZE_ROWS = [
    PreferenceRow(hh("Capital of France?", "Which country?", "France.") + HH_SPLIT, " Paris.", " It is Lyon.", "f", 1),
    PreferenceRow("What is 12 + 30?", "42", "43", "f", 2),
    PreferenceRow([user("Hi"), assistant("Hello!"), user("Tell me a fact.")], "Water boils at 100 °C.",
                  "The moon is made of cheese, obviously.", "f", 3),
    PreferenceRow("Translate 'chat' to English.\n", "cat", "dog 🐕", "f", 4),
]


@pytest.mark.parametrize("template", ["plain", "chat", "auto"])
def test_tokenisation_joint_boundary_and_end_of_turn(tokenizer, template):
    pairs, invalid, stats = tokenize_pairs(TOKENIZE_ROWS, tokenizer, template, max_length=512)
    assert invalid == [] and stats.rows == 4 and stats.truncated == 0 and stats.boundary_merges == 0
    # auto: the row whose prompt is chat messages goes through the chat template, the string prompts stay text
    assert stats.chat_rows == {"plain": 0, "chat": 4, "auto": 1}[template]
    eos = tokenizer.eos_token_id
    for row, pair in zip(TOKENIZE_ROWS, pairs):
        chat = template == "chat" or (template == "auto" and isinstance(row.prompt, list))
        prompt_text = render_prompt(tokenizer, row.prompt, template)
        # the prompt's tokens are exactly the prompt's own tokenisation
        assert pair.prompt_ids == tokenizer(prompt_text, add_special_tokens=not chat)["input_ids"]
        for response, ids, tail in ((row.chosen, pair.chosen_ids, pair.chosen_tail),
                                    (row.rejected, pair.rejected_ids, pair.rejected_tail)):
            if chat:  # the template's rendering of the whole conversation, its end of turn included
                messages = hh_to_messages(row.prompt) if isinstance(row.prompt, str) and "Human:" in row.prompt \
                    else row.prompt if isinstance(row.prompt, list) else [user(row.prompt)]
                whole = tokenizer.apply_chat_template(messages + [assistant(response)], tokenize=False)
                assert tokenizer.decode(ids[-tail:]) == "<|im_end|>\n" and tail == 2
            else:  # prompt + response + the EOS text, tokenised as one string
                whole = prompt_text + response + tokenizer.eos_token
                assert ids[-1] == eos and eos not in ids[:-1] and tail == 1
            assert pair.prompt_ids + ids == tokenizer(whole, add_special_tokens=not chat)["input_ids"]
            assert tokenizer.decode(pair.prompt_ids + ids[:-tail]) == whole[:len(whole) - len(
                tokenizer.decode(ids[-tail:]))]
        assert (pair.source, pair.row, pair.truncated) == ("f", row.row, False)
    if template == "chat":
        assert pairs[0].prompt_ids[-4:] == tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]


def test_tokenisation_boundary_merge_is_counted_and_cut_as_trl_does(tokenizer):
    # a prompt ending in a space: jointly, " yes" is one token crossing the prompt's end, so the prompt keeps only
    # the tokens it shares with prompt + response (TRL's common-prefix rule)
    row = PreferenceRow("Answer: ", "yes", "no", "f", 1)
    pairs, _, stats = tokenize_pairs([row], tokenizer, "plain", max_length=64)
    assert stats.boundary_merges == 1
    (pair,) = pairs
    alone = tokenizer("Answer: ")["input_ids"]
    assert pair.prompt_ids == alone[:-1] and len(pair.prompt_ids) < len(alone)
    assert pair.prompt_ids + pair.chosen_ids == tokenizer("Answer: yes" + tokenizer.eos_token)["input_ids"]
    assert tokenizer.decode(pair.prompt_ids + pair.chosen_ids[:-1]) == "Answer: yes"


def test_render_prompt_chat_for_hh_and_plain_for_messages(tokenizer):
    dialogue = hh("Hi", "Hello!", "A prime?") + HH_SPLIT
    assert hh_to_messages(dialogue) == [user("Hi"), assistant("Hello!"), user("A prime?")]
    assert render_prompt(tokenizer, dialogue, "chat") == tokenizer.apply_chat_template(
        [user("Hi"), assistant("Hello!"), user("A prime?")], tokenize=False, add_generation_prompt=True)
    assert render_prompt(tokenizer, [user("Hi"), assistant("Hello!"), user("A prime?")], "plain") == dialogue
    assert render_prompt(tokenizer, "plain text", "plain") == "plain text"


def test_render_prompt_chat_keeps_text_outside_hh_turns(tokenizer):
    # a TRL prompt that quotes a dialogue is one user message: nothing before "\n\nHuman:" is dropped
    quoted = "Summarise this chat:\n\nHuman: hi\n\nAssistant: hello"
    assert "Summarise this chat:" in render_prompt(tokenizer, quoted, "chat")
    assert render_prompt(tokenizer, quoted, "chat") == tokenizer.apply_chat_template(
        [user(quoted)], tokenize=False, add_generation_prompt=True)
    # an HH dialogue without the leading blank line keeps its first Human turn
    assert hh_to_messages("Human: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:") == [
        user("hi"), assistant("hello"), user("bye")]
    assert hh_to_messages("Context.\n\nHuman: hi\n\nAssistant:") == [user("Context."), user("hi")]


def _long_rows():
    long_response = " " + " ".join(f"word{i}" for i in range(60))
    return [PreferenceRow("Short prompt.", " ok", " no", "f", 1),
            PreferenceRow("Another prompt here.", long_response, " short", "f", 2),
            PreferenceRow("Third.", " fine", " also fine", "f", 3)]


def test_truncation_keep_start_keeps_first_tokens_and_counts(tokenizer):
    rows = _long_rows()
    full, _, full_stats = tokenize_pairs(rows, tokenizer, "plain", max_length=10_000)
    assert full_stats.truncated == 0
    max_length = 20
    assert len(full[1].prompt_ids) + len(full[1].chosen_ids) > max_length
    pairs, invalid, stats = tokenize_pairs(rows, tokenizer, "plain", max_length=max_length, truncation="keep_start")
    assert invalid == [] and stats.rows == 3 and stats.truncated == 1
    assert [p.truncated for p in pairs] == [False, True, False]
    p = pairs[1]
    assert len(p.prompt_ids) + len(p.chosen_ids) == max_length
    assert p.prompt_ids + p.chosen_ids == (full[1].prompt_ids + full[1].chosen_ids)[:max_length]
    assert p.chosen_ids[-1] != tokenizer.eos_token_id  # the cut falls inside the response, as in TRL
    assert p.rejected_ids == full[1].rejected_ids  # the short response is untouched
    assert pairs[0] == full[0] and pairs[2] == full[2]


def test_truncation_error_names_file_and_row(tokenizer):
    with pytest.raises(DataError) as info:
        tokenize_pairs(_long_rows(), tokenizer, "plain", max_length=20, truncation="error")
    assert "f, row 2" in str(info.value) and "max_length=20" in str(info.value)
    pairs, _, stats = tokenize_pairs(_long_rows(), tokenizer, "plain", max_length=200, truncation="error")
    assert len(pairs) == 3 and stats.truncated == 0


def test_max_prompt_length_keeps_last_prompt_tokens(tokenizer):
    prompt = " ".join(f"w{i}" for i in range(40))
    row = PreferenceRow(prompt, " yes", " no", "f", 1)
    (full,), _, _ = tokenize_pairs([row], tokenizer, "plain", max_length=1000)
    assert len(full.prompt_ids) > 8
    (cut,), invalid, stats = tokenize_pairs([row], tokenizer, "plain", max_length=1000, max_prompt_length=8)
    assert cut.prompt_ids == full.prompt_ids[-8:]
    assert cut.chosen_ids == full.chosen_ids and cut.rejected_ids == full.rejected_ids
    assert cut.truncated and stats.truncated == 1 and invalid == []
    # the prompt cut is not a max_length overflow: `truncation: error` accepts it ...
    (cut2,), _, _ = tokenize_pairs([row], tokenizer, "plain", max_length=1000, max_prompt_length=8, truncation="error")
    assert cut2.prompt_ids == cut.prompt_ids
    # ... but still stops when the cut prompt plus a completion exceed max_length
    with pytest.raises(DataError, match="f, row 1: 10 tokens exceed data.max_length=9"):
        tokenize_pairs([row], tokenizer, "plain", max_length=9, max_prompt_length=8, truncation="error")


def test_prompt_leaving_no_room_is_an_invalid_row(tmp_path, tokenizer):
    prompt = " ".join(f"w{i}" for i in range(40))
    rows = [PreferenceRow(prompt, " yes", " no", "f", 1), PreferenceRow("Hi", " yes", " no", "f", 2)]
    pairs, invalid, stats = tokenize_pairs(rows, tokenizer, "plain", max_length=16)
    assert [p.row for p in pairs] == [2] and stats.rows == 1
    assert [(i.source, i.row, i.field) for i in invalid] == [("f", 1, "prompt")]
    assert "leaves no room" in invalid[0].reason
    # exactly max_length prompt tokens: still no room
    n = len(tokenizer(prompt)["input_ids"])
    assert tokenize_pairs(rows[:1], tokenizer, "plain", max_length=n)[1] != []
    assert tokenize_pairs(rows[:1], tokenizer, "plain", max_length=n + 1)[1] == []
    # through load_pairs: error policy raises with file and row, skip policy skips and records it
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": prompt, "chosen": " yes", "rejected": " no"},
                                              {"prompt": "Hi", "chosen": " yes", "rejected": " no"}])
    with pytest.raises(DataError, match=re.escape(f"{path}, row 1, field 'prompt'")):
        load_pairs(DataSource(path=str(path)), DataConfig(template="plain", max_length=16), tokenizer)
    log = tmp_path / "skipped_rows.jsonl"
    pairs, _, invalid = load_pairs(DataSource(path=str(path)), skip_cfg(template="plain", max_length=16), tokenizer,
                                   skipped_log=log)
    assert [p.row for p in pairs] == [2] and [i.row for i in invalid] == [1]
    assert json.loads(log.read_text())["field"] == "prompt"


def test_load_pairs_limit_and_builtin(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", STRING_RECORDS * 3)
    pairs, _, _ = load_pairs(DataSource(path=str(path), limit=4), DataConfig(), tokenizer)
    assert [p.row for p in pairs] == [1, 2, 3, 4]
    pairs, stats, invalid = load_pairs(DataSource(builtin="arithmetic", split="heldout", num_rows=10), DataConfig(),
                                       tokenizer)
    assert len(pairs) == 10 and stats.rows == 10 and invalid == []


def test_tokenizer_without_eos_is_a_data_error(tokenizer):
    class NoEos:
        eos_token_id = None

    with pytest.raises(DataError, match="EOS"):
        tokenize_pairs(TOKENIZE_ROWS, NoEos(), "plain")


# ---------------------------------------------------------------------------------------------- built-in tasks
def _operands(row):
    a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", row.prompt).groups())
    assert (a, b) == (row.extras["a"], row.extras["b"])
    return a, b


def test_arithmetic_task_answers_and_splits():
    train, heldout = builtin_rows("arithmetic", "train"), builtin_rows("arithmetic", "heldout")
    for row in train + heldout:
        a, b = _operands(row)
        assert int(row.chosen) == a + b  # verifiably right
        assert int(row.rejected) != a + b  # verifiably wrong
        assert len(row.rejected) == len(row.chosen) and row.rejected.isdigit()
    train_ops = {_operands(r) for r in train}
    heldout_ops = {_operands(r) for r in heldout}
    assert len(train_ops) == len(train) and len(heldout_ops) == len(heldout)  # no duplicates
    assert not train_ops & heldout_ops
    assert len(heldout_ops) >= 500
    assert train_ops | heldout_ops == {(a, b) for a in range(10, 100) for b in range(10, 100)}
    assert 0.15 < len(heldout) / (len(train) + len(heldout)) < 0.25
    # the wrong-answer rule keeps the digit count at the edges
    assert wrong_sum(10, 99) == 98 and wrong_sum(11, 100) == 101 and wrong_sum(12, 50) == 51


def test_arithmetic_same_token_count_under_chat_template(tokenizer):
    rows = builtin_rows("arithmetic", "heldout") + builtin_rows("arithmetic", "train", num_rows=1500)
    pairs, invalid, stats = tokenize_pairs(rows, tokenizer, "chat", max_length=512)
    assert invalid == [] and stats.truncated == 0 and len(pairs) == len(rows)
    for row, pair in zip(rows, pairs):
        assert len(pair.chosen_ids) == len(pair.rejected_ids) and pair.chosen_tail == pair.rejected_tail == 2
        assert tokenizer.decode(pair.chosen_ids[:-2]) == row.chosen
        assert tokenizer.decode(pair.rejected_ids[:-2]) == row.rejected


def test_builtin_rows_shuffle_num_rows_and_errors():
    a = builtin_rows("arithmetic", "train", num_rows=50, seed=1)
    assert [r.prompt for r in a] == [r.prompt for r in builtin_rows("arithmetic", "train", num_rows=50, seed=1)]
    assert [r.prompt for r in a] != [r.prompt for r in builtin_rows("arithmetic", "train", num_rows=50, seed=2)]
    assert len(a) == 50
    with pytest.raises(RecipeError, match="unknown built-in task"):
        builtin_rows("nope", "train")
    with pytest.raises(RecipeError, match="split"):
        builtin_rows("tiny", "test")
    with pytest.raises(RecipeError, match="too many"):
        builtin_rows("arithmetic", "heldout", num_rows=100_000)


def test_tiny_task_heldout_prompts_disjoint():
    train, heldout = builtin_rows("tiny", "train"), builtin_rows("tiny", "heldout")
    train_prompts, heldout_prompts = {r.prompt for r in train}, {r.prompt for r in heldout}
    assert len(train_prompts) == len(train) and len(heldout_prompts) == len(heldout)
    assert not train_prompts & heldout_prompts
    assert len(heldout) >= 500 and len(train) + len(heldout) == 9000
    for row in train[:200] + heldout[:200]:
        last = int(row.prompt[-1])
        assert row.chosen == str((last + 1) % 10) and row.rejected == str((last + 5) % 10)


# ---------------------------------------------------------------------------------------------- plain rows
def test_plain_pair_rows_layout_and_masks():
    pairs = [TokenizedPair([11, 12, 13], [21, 22], [31]),
             TokenizedPair([14], [23, 24, 25, 26], [32, 33])]
    batch = build_pair_rows(pairs, pad_id=0).as_batch()
    expected_ids = [[11, 12, 13, 21, 22], [14, 23, 24, 25, 26],  # chosen rows first
                    [11, 12, 13, 31, 0], [14, 32, 33, 0, 0]]  # then rejected, right padding
    assert batch["input_ids"].tolist() == expected_ids
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]
    for key in ("input_ids", "attention_mask", "loss_mask"):
        assert batch[key].dtype == torch.long
    with pytest.raises(ValueError, match="no pairs"):
        build_pair_rows([], pad_id=9)


def test_plain_rows_of_real_pairs_loss_mask_covers_completion_tokens(tokenizer):
    pairs, _, _ = tokenize_pairs(TOKENIZE_ROWS, tokenizer, "chat", max_length=512)
    pad = tokenizer.pad_token_id
    batch = build_pair_rows(pairs, pad).as_batch()
    n = len(pairs)
    for i, pair in enumerate(pairs):
        for j, completion in ((i, pair.chosen_ids), (n + i, pair.rejected_ids)):
            ids, mask = batch["input_ids"][j], batch["loss_mask"][j].bool()
            assert ids[mask].tolist() == completion
            length = len(pair.prompt_ids) + len(completion)
            assert ids[:length].tolist() == pair.prompt_ids + completion
            assert batch["attention_mask"][j].sum().item() == length
            assert (ids[length:] == pad).all()
    assert batch["input_ids"].shape[1] == max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
                                              for p in pairs)


HUB_SCRIPT = r'''
import json, sys
from posttrain.config import DataConfig, DataSource
from posttrain.data.prompts import load_prompt_examples
from posttrain.data.readers import load_preference_rows
from posttrain.errors import DataError

out = {}
rows, invalid = load_preference_rows("someone/tiny-prefs", split="train")
out["train"] = [[r.prompt, r.chosen, r.rejected] for r in rows]
out["invalid"] = [str(bad) for bad in invalid]
rows, invalid = load_preference_rows("someone/tiny-prefs", split="test")
out["test"] = len(rows)
examples, skipped = load_prompt_examples("someone/tiny-prefs", split="test")
out["prompts"] = [e.prompt for e in examples]
for name, path, split in [("missing", "someone/missing", "train"), ("no_split", "someone/tiny-prefs", "validation")]:
    try:
        load_preference_rows(path, split=split)
    except DataError as exc:
        out[name] = str(exc)
print(json.dumps(out))
'''


def _hub_cache_entry(cache, tmp_path, repo_id: str, splits: dict[str, list[dict]]) -> None:
    """A dataset in the local datasets cache as `load_dataset(repo_id)` leaves it: Arrow files and
    dataset_info.json under <cache>/<owner>___<name>/default/0.0.0/<hash>/ (built by datasets' json builder)."""
    import shutil

    from datasets.packaged_modules.json.json import Json

    files = {}
    for split, records in splits.items():
        files[split] = str(tmp_path / f"{split}.jsonl")
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    builder = Json(cache_dir=str(tmp_path / "build"), data_files=files)
    builder.download_and_prepare()
    owner, name = repo_id.split("/")
    target = cache / f"{owner}___{name}" / "default" / "0.0.0" / "0123456789abcdef"
    shutil.copytree(builder.cache_dir, target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(target / arrow.name.replace("json-", f"{name}-", 1))


def test_a_hub_dataset_id_loads_from_the_local_cache_offline_and_a_missing_one_is_one_paragraph(tmp_path):
    cache = tmp_path / "cache"
    train = [{"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}, {"prompt": "1 + 1 =", "chosen": " 2",
                                                                      "rejected": " 2"}]
    test = [{"prompt": "3 + 3 =", "chosen": " 6", "rejected": " 7"}]
    _hub_cache_entry(cache, tmp_path, "someone/tiny-prefs", {"train": train, "test": test})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["train"] == [["2 + 2 =", " 4", " 5"]] and out["test"] == 1 and out["prompts"] == ["3 + 3 ="]
    assert out["invalid"] == ["someone/tiny-prefs (Hub dataset, split train), row 2, field 'rejected': chosen and "
                              "rejected are identical"]
    for key in ("missing", "no_split"):
        assert "local datasets cache" in out[key] and "offline mode" in out[key] and "Traceback" not in out[key]
    assert "'someone/missing'" in out["missing"] and "split 'train'" in out["missing"]
    assert "split 'validation'" in out["no_split"] and "validation" in out["no_split"].split(": ", 2)[-1]
    print(out["missing"], out["no_split"], sep="\n")
