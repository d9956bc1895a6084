"""What a TRL user meets in their first hour: `posttrain inspect`, eval on their own file and run, SFT
data for the sft loss, messages that explain, a shareable final adapter, TRL's metric names, the LoRA
options they reach for and the tiny model alias."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import recipe_from, tiny_recipe, write_varied_pairs
from posttrain import cli
from posttrain.errors import DataError, RecipeError
from posttrain.trainer import Trainer


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


# ------------------------------------------------------------------------------------------------ inspect
def test_inspect_prints_each_rows_trained_tokens_decoded_with_the_loss_mask(tiny_model_dir, tmp_path, capsys):
    data = _write_rows(tmp_path / "pairs.jsonl", [
        {"prompt": [{"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "Rome."}]},
        {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}])
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", data={"train": {"path": str(data)}, "heldout": None,
                                                              "template": "auto"})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["inspect", str(path), "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "pairs.jsonl, row 1: prompt 34 tokens, chosen 4, rejected 4" in out
    # Chat messages through the chat template, the completion ending with the end of turn and its newline as TRL's
    assert "[context]  prompt:   <|im_start|>|system|" in out and "|Capital| of| France|?|<|im_end|>|" in out
    assert "[loss]     chosen:   Paris|.|<|im_end|>|\\n\n" in out
    # A string prompt stays raw text; its completion ends with EOS.
    assert "pairs.jsonl, row 2: prompt 5 tokens, chosen 3, rejected 3" in out
    assert "[context]  prompt:   2| +| |2| =\n" in out and "[loss]     rejected:  |5|<|im_end|>\n" in out
    assert not (tmp_path / "run").exists()  # inspect trains nothing, writes nothing


# ------------------------------------------------------------------------------------------- eval, own data
def test_eval_max_pairs_scores_n_valid_pairs_and_says_what_it_read_and_excluded(tiny_model_dir, tmp_path, capsys):
    rows = [{"prompt": f"Question {i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(10)]
    rows[1] = {"prompt": "Same?", "chosen": " a", "rejected": " a"}
    rows[3] = {"prompt": "word " * 200, "chosen": " x", "rejected": " y"}  # the prompt fills --max-length
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "broken\n')  # never read
    out = tmp_path / "report"
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--max-pairs", "5",
                     "--max-length", "64", "--bootstrap", "50", "--no-progress", "--output", str(out)]) == 0
    assert "7 rows read, 5 pairs to score" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["pairs"] == 5 and report["inputs"]["rows_read"] == 7
    assert report["inputs"]["excluded"] == {"rejected: chosen and rejected are identical": 1,
                                            "too long for --max-length 64 (the prompt fills it)": 1}
    summary = (out / "summary.md").read_text()
    assert ("7 rows read. Excluded before scoring: 1 rejected: chosen and rejected are identical; 1 too long for "
            "--max-length 64 (the prompt fills it).") in summary
    assert "{" not in summary.split("Excluded before scoring")[1].splitlines()[0]


def test_eval_of_a_run_uses_the_runs_own_format_and_says_so(tiny_model_dir, tmp_path, capsys):
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", data={"heldout": None, "template": "chat"},
                      train={"max_steps": 1, "batch_size": 4, "micro_batch_size": 4})
    Trainer(recipe_from(raw)).train()
    out = tmp_path / "report"
    assert cli.main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "run"), "--builtin", "tiny",
                     "--max-pairs", "8", "--bootstrap", "20", "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "format: chat (the run's data.template" in printed
    inputs = json.loads((out / "report.json").read_text())["inputs"]
    assert inputs["format"] == "chat" and str(tmp_path / "run" / "recipe.yaml") in inputs["format_source"]


# ----------------------------------------------------------------------------------------- SFT-format data
@pytest.mark.parametrize("layout", ["messages", "prompt_completion"])
def test_sft_loss_trains_on_trl_sft_files_exactly_as_on_the_chosen_side_of_pairs(tiny_model_dir, tmp_path, layout):
    """The sft loss on TRL's SFT formats reads the same tokens, and takes the same first step (float64), as on
    pairs whose chosen responses are those completions."""
    prompts = [f"Name a colour number {i}." for i in range(6)]
    answers = [f"Colour {i} is {c}." for i, c in enumerate("red green blue cyan pink gold".split())]
    if layout == "messages":
        sft_rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
                    for p, a in zip(prompts, answers)]
        pair_rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": a}],
                      "rejected": [{"role": "assistant", "content": "No."}]} for p, a in zip(prompts, answers)]
    else:
        sft_rows = [{"prompt": p, "completion": a} for p, a in zip(prompts, answers)]
        pair_rows = [{"prompt": p, "chosen": a, "rejected": "No."} for p, a in zip(prompts, answers)]
    results = []
    for name, rows in (("sft", sft_rows), ("pairs", pair_rows)):
        data = _write_rows(tmp_path / f"{name}.jsonl", rows)
        raw = tiny_recipe(tiny_model_dir, tmp_path / name, loss={"name": "sft"}, model={"dtype": "float64"},
                          data={"train": {"path": str(data)}, "heldout": None, "template": "auto"},
                          train={"max_steps": 1, "batch_size": 6, "micro_batch_size": 3, "shuffle": False},
                          logging={"report_to": ["jsonl"], "progress_bar": False})
        trainer = Trainer(recipe_from(raw))
        trainer.setup()
        results.append((trainer, trainer.train_step(0)))
    (sft, sft_record), (pairs, pair_record) = results
    for a, b in zip(sft.train_pairs, pairs.train_pairs):
        assert a.prompt_ids == b.prompt_ids and a.chosen_ids == b.chosen_ids
    assert sft_record["loss"] == pytest.approx(pair_record["loss"], rel=1e-12)


def test_sft_data_for_a_pair_loss_names_the_file_row_and_the_fix(tiny_model_dir, tmp_path):
    data = _write_rows(tmp_path / "sft.jsonl", [{"prompt": "Hi", "completion": " there"}] * 3)
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", data={"train": {"path": str(data)}, "heldout": None})
    with pytest.raises(DataError, match=r"sft.jsonl, row 1: SFT data .* loss 'dpo' trains on preference pairs.*"
                                        r"`loss: sft`"):
        Trainer(recipe_from(raw)).setup()


# ------------------------------------------------------------------------------------------------ messages
def test_json_messages_never_say_at_at(tmp_path):
    from posttrain.data.readers import load_preference_rows

    path = tmp_path / "tab.jsonl"
    path.write_text('{"prompt": "a\tb", "chosen": "c", "rejected": "d"}\n')
    with pytest.raises(DataError) as info:
        load_preference_rows(str(path))
    assert "Invalid control character" in str(info.value) and "at at" not in str(info.value)
    assert "line 1" in str(info.value) and "column" in str(info.value)


def test_the_module_search_path_is_listed_once(tmp_path, monkeypatch):
    from posttrain.recipe import load_recipe

    (tmp_path / "my_loss.py").write_text("import no_such_package_xyz\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"loss": {"name": "my_loss:MyLoss"}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    searched = str(info.value).split("Python path (")[1].split(")")[0]
    assert searched == str(tmp_path.resolve())


# -------------------------------------------------------------------------------------------- final adapter
def test_the_final_adapter_names_a_portable_base_model(smollm2_dir, tiny_model_dir, tmp_path):
    """The built-in alias becomes HuggingFaceTB/SmolLM2-135M-Instruct (its README says the weights were
    dequantised from Q4_1); another model keeps the name the recipe gave; lora.adapter_base overrides."""
    import peft
    from transformers import AutoModelForCausalLM

    small = {"max_steps": 1, "batch_size": 2, "micro_batch_size": 2}
    runs = {"alias": ({"name_or_path": "smollm2-135m-instruct"}, {}),
            "local": ({}, {}), "chosen": ({}, {"adapter_base": "/models/my-base"})}
    configs = {}
    for name, (model, lora) in runs.items():
        raw = tiny_recipe(tiny_model_dir, tmp_path / name, model=model, lora=lora, train=small,
                          data={"train": {"builtin": "tiny", "split": "train", "num_rows": 4}, "heldout": None,
                                "template": "plain", "max_length": 32},
                          logging={"report_to": ["jsonl"], "progress_bar": False})
        Trainer(recipe_from(raw)).train()
        configs[name] = json.loads((tmp_path / name / "final" / "adapter_config.json").read_text())
    assert configs["alias"]["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert configs["local"]["base_model_name_or_path"] == str(tiny_model_dir)
    assert configs["chosen"]["base_model_name_or_path"] == "/models/my-base"
    readme = (tmp_path / "alias" / "final" / "README.md").read_text()
    assert "dequantised from Q4_1" in readme and "HuggingFaceTB/SmolLM2-135M-Instruct" in readme
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_dir))  # the adapter still loads on the local copy
    assert isinstance(peft.PeftModel.from_pretrained(base, str(tmp_path / "alias" / "final")), peft.PeftModel)


# ------------------------------------------------------------------------------------------- metric names
def test_dpo_logs_trls_logits_and_cumulative_num_tokens(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_varied_pairs(tmp_path / "varied.jsonl", n=8)
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", data={"train": {"path": str(data)}, "heldout": None},
                      train={"max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "shuffle": False},
                      model={"dtype": "float64"}, logging={"report_to": ["jsonl"], "progress_bar": False})
    trainer = Trainer(recipe_from(raw))
    trainer.train()
    lines = _metrics(tmp_path / "run")
    pairs = trainer.train_pairs
    tokens = [sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs[s:s + 4])
              for s in (0, 4)]
    assert [x["num_tokens"] for x in lines] == [tokens[0], tokens[0] + tokens[1]]
    # Step 1 runs on the untrained adapter (LoRA B = 0): TRL's logits/chosen is the base model's mean logit over
    # the vocabulary, averaged over the step's chosen tokens.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64)
    for side in ("chosen", "rejected"):
        total = count = 0.0
        for p in pairs[:4]:
            completion = getattr(p, f"{side}_ids")
            ids = torch.tensor([p.prompt_ids + completion])
            with torch.no_grad():
                logits = base(input_ids=ids).logits[0, len(p.prompt_ids) - 1:-1]
            total += logits.mean(-1).sum().item()
            count += len(completion)
        assert lines[0][f"logits/{side}"] == pytest.approx(total / count, rel=1e-9)


def test_grpo_logs_trls_metric_names_with_their_values(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", loss={"name": "grpo"},
                      rewards=[{"name": "online_rewards:letter_share"}],
                      data={"train": {"builtin": "tiny", "split": "train"}, "heldout": None, "template": "plain"},
                      rollout={"group_size": 4, "max_new_tokens": 6, "reward_workers": 0, "updates_per_batch": 2},
                      train={"max_steps": 2, "batch_size": 2, "micro_batch_size": 1, "lr": 5e-2},
                      logging={"report_to": ["jsonl"], "progress_bar": False})
    Trainer(recipe_from(raw)).train()
    lines = _metrics(tmp_path / "run")
    for line in lines:
        assert line["reward"] == line["reward/mean"]
        assert line["frac_reward_zero_std"] == line["groups/zero_variance_share"]
        assert line["completions/clipped_ratio"] == line["completions/truncated_share"]
        assert line["reward_std"] >= line["reward/std"]  # unbiased over the 8 completions
        assert line["reward_std"] == pytest.approx(line["reward/std"] * (8 / 7) ** 0.5)
        assert 0 <= line["completions/min_length"] <= line["completions/mean_length"] <= 6
        assert 0 <= line["clip_ratio/low_min"] <= line["clip_ratio/low_mean"]
        assert line["clip_ratio/high_mean"] <= line["clip_ratio/high_max"] <= 1
    assert 0 < lines[0]["num_tokens"] < lines[1]["num_tokens"]


def test_min_and_max_metrics_reduce_over_the_real_examples_only():
    from posttrain.steps.common import StepMetrics

    class OneProcess:
        num_processes = 1

    metrics = StepMetrics(torch.device("cpu"))
    weight = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)  # the third row is a zero-weight filler
    metrics.add_per_example({"share_min": torch.tensor([0.3, 0.2, 0.0]), "share_max": torch.tensor([0.3, 0.2, 0.9]),
                             "share": torch.tensor([0.3, 0.2, 0.9])}, weight)
    metrics.add_per_example({"share_min": torch.tensor([0.25]), "share_max": torch.tensor([0.5]),
                             "share": torch.tensor([0.1])}, torch.tensor([1.0]))
    out = metrics.reduce(OneProcess())
    assert out["share_min"] == pytest.approx(0.2) and out["share_max"] == pytest.approx(0.5)
    assert out["share"] == pytest.approx(0.6 / 3)


# -------------------------------------------------------------------------------------------- LoRA options
@pytest.mark.parametrize("option", ["use_dora", "use_rslora", "modules_to_save"])
def test_lora_options_reach_peft_and_the_saved_adapter_reloads_to_the_trained_policy(tiny_model_dir, tmp_path,
                                                                                     option):
    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    value = ["lm_head"] if option == "modules_to_save" else True
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", lora={option: value},
                      data={"heldout": None}, train={"max_steps": 2, "batch_size": 4, "micro_batch_size": 4},
                      logging={"report_to": ["jsonl"], "progress_bar": False})
    trainer = Trainer(recipe_from(raw))
    trainer.train()
    final = tmp_path / "run" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config[option] == value or set(config[option]) == set(value)
    tensors = load_file(str(final / "adapter_model.safetensors"))
    if option == "use_dora":
        assert any("lora_magnitude_vector" in k for k in tensors)
    if option == "modules_to_save":
        assert any("lm_head" in k for k in tensors)
    trained = trainer.peft_model
    if option == "use_rslora":
        layer = next(m for m in trained.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
        assert layer.scaling["default"] == pytest.approx(16 / 8 ** 0.5)  # alpha / sqrt(r), not alpha / r
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(final))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        assert (reloaded(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-4  # it trained


def test_the_tiny_model_alias_trains_with_the_real_tokenizer(tmp_path):
    from posttrain.models import load_tokenizer, resolve_model_path

    path = Path(resolve_model_path("tiny-random-llama"))
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    tokenizer = load_tokenizer("tiny-random-llama")
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    raw = tiny_recipe(Path("tiny-random-llama"), tmp_path / "run", data={"heldout": None},
                      train={"max_steps": 2, "batch_size": 4, "micro_batch_size": 4},
                      logging={"report_to": ["jsonl"], "progress_bar": False})
    raw["model"]["name_or_path"] = "tiny-random-llama"
    summary = Trainer(recipe_from(raw)).train()
    assert summary["steps"] == 2 and (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- plots of a run
def test_plot_writes_labelled_pngs_of_a_run_and_the_run_ends_with_a_summary_table(tiny_model_dir, tmp_path, capsys):
    import matplotlib.image as mpimg

    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", train={"max_steps": 4, "batch_size": 8, "micro_batch_size": 8},
                      eval={"every": 2, "batch_size": 64}, logging={"report_to": ["jsonl"], "progress_bar": False})
    Trainer(recipe_from(raw)).train()
    out = capsys.readouterr().out
    table = out[out.index("steps  time"):].splitlines()[:2]
    assert table[0].split()[:3] == ["steps", "time", "tokens/s"] and "ranking accuracy before" in table[0]
    assert table[1].split()[0] == "4" and float(table[1].split()[2]) > 0
    assert cli.main(["plot", str(tmp_path / "run")]) == 0
    names = sorted(p.name for p in (tmp_path / "run" / "plots").iterdir())
    assert names == ["accuracy.png", "heldout.png", "loss.png", "rewards.png"]
    for name in names:
        image = mpimg.imread(tmp_path / "run" / "plots" / name)
        assert image.shape[0] > 200 and image.shape[1] > 400
    from posttrain.eval.run_plots import plot_run

    with pytest.raises(Exception, match="holds no metrics.jsonl"):
        plot_run(tmp_path / "nosuch", tmp_path / "x")


# ------------------------------------------------------------------------------------------- posttrain check
MICRO_BATCH_MEAN_LOSS = '''
import torch.nn.functional as F

from posttrain.losses.base import LossOutput, LossPlugin, reference_sums, sequence_sums


class MicroBatchMeanDPO(LossPlugin):
    """DPO averaged over its own micro-batch: the bug the check is for (TRL-style per-micro-batch mean)."""
    level = "sequence"

    def __call__(self, inputs):
        s_w = sequence_sums(inputs.chosen_logps, inputs.chosen_mask)
        s_l = sequence_sums(inputs.rejected_logps, inputs.rejected_mask)
        r_w, r_l = reference_sums(inputs)
        per_pair = -F.logsigmoid(0.1 * ((s_w - r_w) - (s_l - r_l)))
        return LossOutput(per_pair / inputs.pair_weight.sum())
'''


@pytest.mark.parametrize("loss, passes", [({"name": "dpo", "params": {"beta": 0.5}}, True),
                                          ({"name": "bad_loss:MicroBatchMeanDPO"}, False)])
def test_posttrain_check_passes_a_builtin_loss_and_fails_a_micro_batch_mean(tiny_model_dir, tmp_path, capsys, loss,
                                                                         passes):
    (tmp_path / "bad_loss.py").write_text(MICRO_BATCH_MEAN_LOSS)
    data = write_varied_pairs(tmp_path / "varied.jsonl", n=8)
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", loss=loss, data={"train": {"path": str(data)}, "heldout": None},
                      train={"batch_size": 4, "micro_batch_size": 4})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = cli.main(["check", str(path)])
    out = capsys.readouterr().out
    assert code == (0 if passes else 1), out
    lines = out.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("way ")):]
    assert [line.split("  ")[0].strip() for line in lines[1:5]] == [
        "1 micro-batch of 4", "4 micro-batches of 1", "uneven: 3 + 1", "2 processes (gloo DDP)"]
    if passes:
        assert "verdict: pass" in out
        assert all(float(line.split()[-1]) <= 1e-6 for line in lines[1:5])  # gradient differences
    else:
        assert "verdict: FAIL" in out and "normalises by a micro-batch" in out and "<- differs" in out
    assert not (tmp_path / "run").exists()  # the check trains in a temporary directory


# ------------------------------------------------------------------------------------------------- export
def test_export_merges_into_a_plain_transformers_model_equal_to_the_adapter(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    import peft
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", data={"heldout": None},
                      train={"max_steps": 2, "batch_size": 8, "micro_batch_size": 8, "lr": 5e-2},
                      logging={"report_to": ["jsonl"], "progress_bar": False})
    Trainer(recipe_from(raw)).train()
    merged, adapter, half = tmp_path / "merged", tmp_path / "adapter", tmp_path / "merged-bf16"
    assert cli.main(["export", str(tmp_path / "run"), "--output", str(merged), "--merge"]) == 0
    assert cli.main(["export", str(tmp_path / "run"), "--output", str(adapter)]) == 0
    assert cli.main(["export", str(tmp_path / "run" / "final"), "--output", str(half), "--merge", "--dtype", "bf16"]) == 0
    # plain transformers, in a process that never imports posttrain, with the chat template
    code = ("import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "t = transformers.AutoTokenizer.from_pretrained(sys.argv[1]); "
            "assert 'posttrain' not in sys.modules and t.chat_template and type(m).__name__ == 'LlamaForCausalLM'; "
            "print(t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False))")
    result = subprocess.run([sys.executable, "-c", code, str(merged)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "<|im_start|>user\nhi<|im_end|>" in result.stdout
    assert "auto_map" not in json.loads((merged / "config.json").read_text())
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(merged))(input_ids=ids).logits
        with_adapter = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                                      str(adapter))(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))(input_ids=ids).logits
    torch.testing.assert_close(plain, with_adapter, rtol=1e-5, atol=1e-5)
    assert (plain - base).abs().max() > 1e-3  # the adapter was trained and is in the merged weights
    with safe_open(str(next(half.glob("*.safetensors"))), "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.bfloat16
    with pytest.raises(Exception, match="exists and is not empty"):
        cli_export = __import__("posttrain.export", fromlist=["export"]).export
        cli_export(str(tmp_path / "run"), str(merged))


# --------------------------------------------------------------------------------------------------- chat
def test_chat_streams_greedy_answers_through_a_pseudo_terminal(smollm2_dir):
    """Two turns typed into a real pseudo-terminal, SmolLM2 answering: each streamed reply equals transformers'
    greedy generation on the chat template's rendering of the conversation so far; Ctrl-D ends with status 0."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir))
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))

    def greedy(messages):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    first = greedy([{"role": "user", "content": "What is 2 + 3?"}])
    second = greedy([{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "And 4 + 4?"}])
    assert first.strip() and second.strip()
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "chat", str(smollm2_dir), "--temperature", "0",
                             "--max-new-tokens", "8"], stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, env=env)
    os.close(slave)
    seen = ""

    def read_until(count: int, timeout: float = 240.0) -> None:
        """Read the terminal until it has shown the `you> ` prompt `count` times."""
        nonlocal seen
        deadline = time.time() + timeout
        while seen.count("you> ") < count and time.time() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                seen += os.read(master, 4096).decode(errors="replace")
        assert seen.count("you> ") >= count, seen[-500:]

    read_until(1)
    os.write(master, b"What is 2 + 3?\n")
    read_until(2)
    os.write(master, b"And 4 + 4?\n")
    read_until(3)
    os.write(master, b"\x04")  # Ctrl-D: end of input
    assert proc.wait(timeout=60) == 0
    os.close(master)
    transcript = seen.replace("\r\n", "\n")  # the terminal writes newlines as CR LF
    assert f"you> What is 2 + 3?\nassistant> {first}\nyou> And 4 + 4?\nassistant> {second}\nyou> " in transcript
