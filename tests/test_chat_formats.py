"""The data formats TRL users bring: conversational pairs with multi-turn history and TRL's `tools` column
(tokenised token for token as TRL 1.16's DPOTrainer prepares them), tools for prompts, the load-time check
that the chat template is prefix-preserving for the data's turns, and a `datasets` hub id read from the
local cache (or a clear error when it is not there)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from posttrain.config import DataConfig, DataSource
from posttrain.data.sources import load_pairs
from posttrain.data.tokenize import prompt_token_ids
from posttrain.errors import DataError
from test_trl_tokenisation import _trl_prepared

# SmolLM2's template with a tools block in front (as tool-calling templates write one); SmolLM2's own ignores tools
TOOLS_BLOCK = ("{% if tools %}<|im_start|>system\nYou may call these tools:\n{% for tool in tools %}"
               "{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}")
# a template that is not prefix-preserving: its generation prompt opens an empty thinking block that an
# assistant turn rendered after the prompt does not have (as some reasoning models' templates do)
THINKING_PROMPT = "<|im_start|>assistant\n<think>\n\n</think>\n"

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def _tokenizer(smollm2_dir, tmp_path, template: str):
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    tok.chat_template = template
    tok.save_pretrained(tmp_path / "tokenizer")
    return AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))


def _multi_turn_rows() -> list[dict]:
    """Multi-turn history, and `tools` as JSON text in every row (an Arrow column holds one type, so TRL datasets
    carry tools as text; "[]" for none)."""
    history = [{"role": "user", "content": "Hi! Can you help me plan a trip?"},
               {"role": "assistant", "content": "Of course. Where would you like to go?"},
               {"role": "user", "content": "Lisbon, in May. What is the weather like?"}]
    return [
        {"prompt": history, "chosen": [{"role": "assistant", "content": "Mild and sunny, around 22 C."}],
         "rejected": [{"role": "assistant", "content": "It snows a lot."}], "tools": "[]"},
        {"prompt": history[:1], "chosen": [{"role": "assistant", "content": "Happy to. Where to?"}],
         "rejected": [{"role": "assistant", "content": "No."}], "tools": json.dumps([WEATHER])},
        {"prompt": history, "chosen": [{"role": "assistant", "content": "Let me check: get_weather(Lisbon)"}],
         "rejected": [{"role": "assistant", "content": "I cannot know."}], "tools": json.dumps([WEATHER])},
        {"prompt": history, "chosen": [{"role": "assistant", "content": "Warm."}],
         "rejected": [{"role": "assistant", "content": "Cold."}], "tools": "[]"},
    ]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_multi_turn_pairs_with_tools_tokenise_as_trl_does(smollm2_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    tok = _tokenizer(smollm2_dir, tmp_path, TOOLS_BLOCK + tokenizer.chat_template)
    rows = _multi_turn_rows()
    pairs, stats, invalid = load_pairs(DataSource(path=str(_write(tmp_path / "pairs.jsonl", rows))),
                                       DataConfig(max_length=100_000), tok)
    assert invalid == [] and len(pairs) == 4 and stats.chat_rows == 4
    theirs = _trl_prepared(rows, tok, tmp_path)
    for k, (pair, trl) in enumerate(zip(pairs, theirs)):
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == trl, f"row {k + 1}"
    prompts = [tok.decode(p.prompt_ids) for p in pairs]
    assert "get_weather" not in prompts[0] and "get_weather" in prompts[1] and "get_weather" in prompts[2]
    assert "get_weather" not in prompts[3]  # an empty tools list renders no tool block (TRL's `tools or None`)
    as_lists = [{**row, "tools": json.loads(row["tools"])} for row in rows]  # JSONL may hold the schemas as is
    same, _, _ = load_pairs(DataSource(path=str(_write(tmp_path / "lists.jsonl", as_lists))),
                            DataConfig(max_length=100_000), tok)
    assert [p.prompt_ids for p in same] == [p.prompt_ids for p in pairs]
    assert prompts[0].count("<|im_start|>user") == 2 and "Where would you like to go?" in prompts[0]
    assert tok.decode(pairs[0].chosen_ids) == "Mild and sunny, around 22 C.<|im_end|>\n"


def test_prompt_data_tools_reach_the_chat_template(smollm2_dir, tokenizer, tmp_path):
    from posttrain.data.prompts import load_prompt_examples
    from posttrain.data.tokenize import chat_template_kwargs

    tok = _tokenizer(smollm2_dir, tmp_path, TOOLS_BLOCK + tokenizer.chat_template)
    path = _write(tmp_path / "prompts.jsonl", [{"prompt": "Weather in Lisbon?", "answer": "22", "tools": [WEATHER]}])
    [example], _ = load_prompt_examples(str(path))
    ids = prompt_token_ids(tok, example.prompt, "chat", chat_template_kwargs(example.extras, example.source, 1))
    assert ids == tok.apply_chat_template([{"role": "user", "content": "Weather in Lisbon?"}], tools=[WEATHER],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
    assert "get_weather" in tok.decode(ids)


def test_a_template_that_is_not_prefix_preserving_is_an_error_naming_the_row(smollm2_dir, tokenizer, tmp_path):
    template = tokenizer.chat_template.replace("{{ '<|im_start|>assistant\n' }}", "{{ '" + THINKING_PROMPT + "' }}")
    assert template != tokenizer.chat_template
    tok = _tokenizer(smollm2_dir, tmp_path, template)
    path = _write(tmp_path / "pairs.jsonl", _multi_turn_rows()[:2])
    with pytest.raises(DataError, match=r"pairs.jsonl, row 1: the chat template is not prefix-preserving for this "
                                        r"row's turns: from character \d+ the prompt renders as '<think>.*data.template: "
                                        r"plain"):
        load_pairs(DataSource(path=str(path)), DataConfig(max_length=100_000), tok)


@pytest.mark.parametrize("tools, words", [
    ("[{not json", r"row 1: field 'tools' is a string but not JSON"),
    ({"name": "f"}, r"row 1: field 'tools' must be a list of function schemas \(objects\), got dict"),
    (["get_weather"], r"row 1: field 'tools' must be a list of function schemas"),
])
def test_a_malformed_tools_field_names_the_file_row_and_field(tokenizer, tmp_path, tools, words):
    row = {**_multi_turn_rows()[0], "tools": tools}
    path = _write(tmp_path / "pairs.jsonl", [row])
    with pytest.raises(DataError, match=r"pairs.jsonl, " + words):
        load_pairs(DataSource(path=str(path)), DataConfig(max_length=100_000), tokenizer)
