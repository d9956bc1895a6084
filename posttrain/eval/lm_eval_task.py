"""An lm-evaluation-harness task for local prompt data (`posttrain lm-eval-task`; docs/evaluation.md).

The prompts are read as posttrain reads them (GSM8K, MATH, RL and prompt/answer formats, or a built-in task),
written as `data.jsonl` (`prompt`, `answer`) beside a task YAML that lm-eval loads with `--include_path DIR`:
greedy generation, the last number of the completion as the answer (as posttrain's `math` reward extracts it
when there is no "####" or \\boxed{}), exact match against the gold answer. No hub access: the data is a local
JSON file (`dataset_path: json`).
"""

from __future__ import annotations

import json
from pathlib import Path

LAST_NUMBER = r"(-?[0-9][0-9,]*(?:\.[0-9]+)?)"


def task_yaml(name: str, data_file: Path, max_new_tokens: int) -> str:
    return f"""# written by `posttrain lm-eval-task`; lm-eval --include_path {data_file.parent} --tasks {name}
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data_file.resolve()))}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  do_sample: false
  max_gen_toks: {max_new_tokens}
filter_list:
  - name: last_number
    filter:
      - function: regex
        regex_pattern: {json.dumps(LAST_NUMBER)}
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: [",", "\\\\$"]
metadata:
  version: 1.0
"""


def write_lm_eval_task(examples: list, output_dir: Path, name: str, max_new_tokens: int) -> Path:
    """DIR/data.jsonl and DIR/<name>.yaml for `examples` (PromptExample); returns the YAML's path."""
    if not name.isidentifier():
        raise ValueError(f"the task name must be letters, digits and underscores, got {name!r}")
    output_dir.mkdir(parents=True, exist_ok=True)
    data = output_dir / "data.jsonl"
    with data.open("w", encoding="utf-8") as handle:
        for example in examples:
            if not isinstance(example.prompt, str):
                raise ValueError(f"{example.where}: lm-eval tasks take text prompts; this one is a message list")
            handle.write(json.dumps({"prompt": example.prompt, "answer": example.answer}) + "\n")
    path = output_dir / f"{name}.yaml"
    path.write_text(task_yaml(name, data, max_new_tokens), encoding="utf-8")
    return path
