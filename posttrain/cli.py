"""Command line: `posttrain train RECIPE.yaml [--set key=value ...] [--resume] [--force]`,
`posttrain eval ...`, `posttrain validate RECIPE.yaml`, `posttrain inspect RECIPE.yaml [--rows N]`,
`posttrain plot RUN`, `posttrain check RECIPE`, `posttrain export RUN`, `posttrain chat RUN`,
`posttrain losses`.

Also runs as `accelerate launch -m posttrain train RECIPE.yaml`. A user mistake (bad recipe, data,
path) prints one paragraph and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from posttrain.errors import PosttrainError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train with a recipe")
    train.add_argument("recipe")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set train.lr=1e-4 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    train.add_argument("--force", action="store_true",
                       help="resume although the recipe changed, or start over in a directory with checkpoints")

    validate = sub.add_parser("validate", help="check a recipe and its data without loading any model")
    validate.add_argument("recipe")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    inspect = sub.add_parser("inspect", help="show what is trained per row: prompt and completion tokens, decoded, "
                                             "with the loss mask (no model is loaded)")
    inspect.add_argument("recipe")
    inspect.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    inspect.add_argument("--rows", type=int, default=3, help="how many training rows to show (default 3)")
    inspect.add_argument("--split", choices=["train", "heldout"], default="train")

    check = sub.add_parser("check", help="run the recipe's first step split four ways (tiny float64 model) and "
                                         "check that loss and gradient do not change")
    check.add_argument("recipe")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--no-processes", action="store_true", help="skip the two-process run")

    exp = sub.add_parser("export", help="the adapter as is, or merged into the base model (safetensors, tokenizer, "
                                        "chat template) for transformers or vllm")
    exp.add_argument("source", help="a run directory, its final/ or checkpoint adapter, or an adapter directory")
    exp.add_argument("--output", required=True)
    exp.add_argument("--merge", action="store_true", help="fold the adapter into the base weights")
    exp.add_argument("--dtype", default="float32", help="float32 (default), bfloat16/bf16 or float16/fp16")
    exp.add_argument("--model", default=None, help="the base model (default: the run's model.name_or_path)")

    talk = sub.add_parser("chat", help="talk to a trained model: its answers stream as they are generated")
    talk.add_argument("source", help="a run directory, an adapter or a model directory")
    talk.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    talk.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    talk.add_argument("--max-new-tokens", type=int, default=256)
    talk.add_argument("--system", default=None, help="a system message")
    talk.add_argument("--model", default=None, help="the base model of an adapter (default: the run's)")

    plot = sub.add_parser("plot", help="PNG plots of a run's loss, rewards, accuracy and held-out metrics against step")
    plot.add_argument("run", help="the run directory (run.output_dir)")
    plot.add_argument("--output", default=None, help="where to write the PNGs (default RUN/plots)")

    ev = sub.add_parser("eval", help="ranking accuracy (R, R~, R*, alignment gap, difficulty) on preference pairs",
                        description="Ranking accuracy of a model, adapter or checkpoint on preference pairs, with the "
                                    "idealised accuracy R*, the alignment gap and per-pair difficulty (Chen et al. "
                                    "2024; docs/evaluation.md).")
    ev.add_argument("--model", default="smollm2-135m-instruct", help="model id, directory or alias")
    ev.add_argument("--adapter", default=None,
                    help="a peft adapter directory, a run directory (its final/), or a checkpoint checkpoints/step-N")
    ev.add_argument("--reference", default=None,
                    help="reference model for R* and the difficulty (default: the base model with the adapter off, "
                         "or the scored model itself when there is no adapter)")
    ev.add_argument("--data", default=None, help="preference data file or datasets directory (also PandaLM's "
                                                 "testset JSON, whose annotator votes give alpha)")
    ev.add_argument("--builtin", default=None, help="a built-in task instead of --data (split heldout)")
    ev.add_argument("--split", default=None, help="split of a datasets directory or built-in task")
    ev.add_argument("--format", dest="template", choices=["plain", "chat", "auto"], default=None,
                    help="plain: prompt + response as text, as Chen et al. scored; chat: the chat template; auto: "
                         "chat messages through the chat template, text as is (TRL's rule). Default: the run's own "
                         "data.template with --adapter RUN, else plain")
    ev.add_argument("--start", type=int, default=0, help="skip the first N valid pairs")
    ev.add_argument("--max-pairs", type=int, default=None,
                    help="score N pairs (after --start): rows are read until N can be scored; later rows are not read")
    ev.add_argument("--sample", type=int, default=None, help="score a random sample of N pairs (seeded by --seed)")
    ev.add_argument("--max-length", type=int, default=512)
    ev.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    ev.add_argument("--layout", choices=["auto", "shared", "separate"], default="auto",
                    help="shared: one row per pair, the prompt computed once; separate: one row per sequence")
    ev.add_argument("--max-padding", type=float, default=0.1,
                    help="end a batch early rather than pad more than this share of its positions (1: never)")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    ev.add_argument("--bf16", action="store_true",
                    help="bfloat16 autocast for the forward passes (faster on CPUs with AMX; scores change slightly)")
    ev.add_argument("--betas", default="0.01,0.1,1,5,10", help="betas for R* (comma-separated)")
    ev.add_argument("--beta", type=float, default=0.1, help="DPO beta of the difficulty thresholds and the DPO loss")
    ev.add_argument("--alpha", type=float, default=1.0,
                    help="preference probability of pairs without votes or an alpha field (default 1)")
    ev.add_argument("--alpha-eps", type=float, default=1e-3, help="loser fraction used where alpha = 1")
    ev.add_argument("--tie-threshold", type=float, default=0.01, help="tie test for pairs with alpha = 0.5")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--output", default=None,
                    help="directory for report.json, pairs.jsonl, summary.md and the plots")
    ev.add_argument("--threads", type=int, default=None, help="torch threads")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen = ev.add_argument_group("generation (--generate: prompt data, docs/evaluation.md)")
    gen.add_argument("--generate", action="store_true",
                     help="generate answers to prompt data and report greedy pass@1, pass@k and maj@k with a reward")
    gen.add_argument("--samples", type=int, default=8, help="sampled completions per prompt for pass@k, maj@k (0: none)")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--max-prompts", type=int, default=None, help="the first N prompts (after --start)")
    gen.add_argument("--reward", default="math", help="the reward that scores a completion (a registered name)")
    gen.add_argument("--threshold", type=float, default=0.5,
                     help="a completion succeeds when its reward is at least this (sampler.success_threshold)")

    task = sub.add_parser("lm-eval-task", help="write an lm-evaluation-harness task for local prompt data",
                          description="Prompt data read as posttrain reads it, written with a task YAML that lm-eval "
                                      "loads with --include_path (greedy, last number, exact match; docs/evaluation.md).")
    task.add_argument("--data", default=None, help="prompt data (GSM8K, MATH, RL or prompt/answer JSONL)")
    task.add_argument("--builtin", default=None, help="a built-in task instead of --data")
    task.add_argument("--split", default=None, help="split of a built-in task (default heldout) or datasets directory")
    task.add_argument("--start", type=int, default=0, help="skip the first N prompts")
    task.add_argument("--max-prompts", type=int, default=None, help="the first N prompts (after --start)")
    task.add_argument("--name", default="posttrain_local", help="the lm-eval task name")
    task.add_argument("--max-new-tokens", type=int, default=256)
    task.add_argument("--output", required=True, help="directory for the task YAML and its data.jsonl")

    server = sub.add_parser("rollout-server", help="serve the base model with vLLM for rollout.engine: vllm_server",
                            description="`vllm serve` for posttrain's trainer: OpenAI-compatible, LoRA adapters loaded "
                                        "at run time, bound to 127.0.0.1 unless --host says otherwise "
                                        "(docs/online_rl.md, \"Engines\"). Arguments after -- go to vLLM.")
    server.add_argument("--model", required=True, help="the recipe's model.name_or_path (the built-in alias or a path)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    server.add_argument("--api-key", default=None, help="require this key (the recipe's rollout.vllm.api_key)")
    server.add_argument("--lora-rank", type=int, default=16, help="the largest LoRA rank the trainer will load")
    server.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    server.add_argument("--max-model-len", type=int, default=2048)
    server.add_argument("--kv-cache-gib", type=int, default=2, help="CPU: the KV cache's size")
    server.add_argument("vllm_args", nargs="*", help="more arguments for vllm serve (after --)")

    sub.add_parser("losses", help="list the registered losses and their parameters")
    return parser


def _rollout_server(args) -> int:
    import subprocess

    from posttrain.models import resolve_model_path
    from posttrain.rollout.vllm_engine import rollout_server_command

    argv, env = rollout_server_command(args.model, resolve_model_path(args.model), args.port, args.host, args.api_key,
                                       args.lora_rank, args.dtype, args.max_model_len, args.kv_cache_gib,
                                       extra=args.vllm_args)
    print(f"posttrain rollout-server: {args.model} on http://{args.host}:{args.port} (vLLM; Ctrl-C stops it)",
          file=sys.stderr)
    try:
        return subprocess.call(argv, env=env)
    except KeyboardInterrupt:
        return 130


def _train(args) -> int:
    from posttrain.recipe import load_recipe
    from posttrain.trainer import Trainer

    recipe = load_recipe(args.recipe, args.overrides)
    Trainer(recipe, args.recipe, resume=args.resume, force=args.force).train()
    return 0


def _recipe_data(args):
    """The recipe, its loss, tokenizer and data, as training would load them, without any model."""
    from pathlib import Path

    from posttrain.losses import build_loss
    from posttrain.models import load_tokenizer
    from posttrain.recipe import load_recipe
    from posttrain.steps.run_data import load_run_data

    recipe = load_recipe(args.recipe, args.overrides)
    search_dirs = [Path(args.recipe).resolve().parent]
    loss = build_loss(recipe.loss, search_dirs)
    tokenizer = load_tokenizer(recipe.model.name_or_path, recipe.model.trust_remote_code)
    return recipe, tokenizer, load_run_data(recipe, loss, tokenizer, search_dirs)


def _validate(args) -> int:
    _, _, data = _recipe_data(args)
    print(f"{args.recipe}: valid (recipe, plug-ins and data: {data.summary()})")
    return 0


def _check(args) -> int:
    from posttrain.check import format_table, run_check

    rows, ok = run_check(args.recipe, args.overrides, processes=not args.no_processes)
    print(format_table(rows, ok))
    return 0 if ok else 1


def _export(args) -> int:
    from posttrain.export import export

    print(f"exported to {export(args.source, args.output, args.merge, args.dtype, args.model)}")
    return 0


def _chat(args) -> int:
    from posttrain.chat import chat

    return chat(args.source, args.prompt, args.temperature, args.max_new_tokens, args.model, args.system)


def _plot(args) -> int:
    from pathlib import Path

    from posttrain.eval.run_plots import plot_run

    for path in plot_run(Path(args.run), Path(args.output) if args.output else Path(args.run) / "plots"):
        print(path)
    return 0


def _inspect(args) -> int:
    from posttrain.data.inspect import describe_pair, describe_prompt

    recipe, tokenizer, data = _recipe_data(args)
    pairs = data.train_pairs if args.split == "train" else data.heldout_pairs
    prompts = data.train_prompt_ids if args.split == "train" else data.heldout_prompt_ids
    examples = data.train_examples if args.split == "train" else data.heldout_examples
    print(f"{args.recipe}: data.{args.split}, template {recipe.data.template}, {data.summary()}; "
          f"[loss] marks the tokens the loss is computed on, [context] the others\n")
    if examples:
        for example, ids in list(zip(examples, prompts))[:args.rows]:
            print(describe_prompt(tokenizer, example, ids))
    else:
        for pair in pairs[:args.rows]:
            print(describe_pair(tokenizer, pair))
    return 0


def _eval(args) -> int:
    from posttrain.eval.api import run_eval
    from posttrain.eval.generate import run_generation_eval

    if args.generate:
        if (args.data is None) == (args.builtin is None):
            raise PosttrainError("posttrain eval --generate: give exactly one of --data PATH or --builtin TASK.")
        return run_generation_eval(args)
    return run_eval(args)


def _lm_eval_task(args) -> int:
    from posttrain.data.prompts import load_prompt_examples
    from posttrain.eval.lm_eval_task import write_lm_eval_task

    if (args.data is None) == (args.builtin is None):
        raise PosttrainError("posttrain lm-eval-task: give exactly one of --data PATH or --builtin TASK.")
    path = args.data if args.data is not None else f"builtin:{args.builtin}"
    examples, _ = load_prompt_examples(path, "auto", args.split or ("heldout" if args.builtin else "train"),
                                       args.start, args.max_prompts, what="--data" if args.data else "--builtin")
    try:
        yaml_path = write_lm_eval_task(examples, Path(args.output), args.name, args.max_new_tokens)
    except ValueError as exc:
        raise PosttrainError(f"posttrain lm-eval-task: {exc}") from None
    print(f"wrote {yaml_path} and {yaml_path.parent / 'data.jsonl'} ({len(examples)} prompts). Evaluate with:\n"
          f"  lm-eval run --model hf --model_args pretrained=MODEL_DIR[,peft=ADAPTER_DIR] --include_path "
          f"{yaml_path.parent} --tasks {args.name} --apply_chat_template --batch_size 16")
    return 0


def _losses(_args) -> int:
    import dataclasses

    from posttrain.losses import LOSSES

    print("level and reference are those of the default params; the note says which params change them")
    for name, cls in sorted(LOSSES.items()):
        loss = cls()  # the defaults: level and reference can depend on the params (GRPO's loss_type, beta)
        fields = ", ".join(f"{f.name}={f.default_factory() if f.default is dataclasses.MISSING else f.default!r}"
                           for f in dataclasses.fields(cls.Params))
        data = loss.data_kind if loss.data_kind == "groups" else "/".join(loss.row_kinds)
        print(f"{name:12s} data={data:17s} level={loss.level:16s} "
              f"reference={'yes' if loss.needs_reference else 'no':3s}  {fields}{LEVEL_NOTES.get(name, '')}")
    return 0


LEVEL_NOTES = {"grpo": "  [level token for loss_type dapo/bnpo, sequence for grpo/dr_grpo; reference iff beta > 0]",
               "sft": "  [level token for reduction token_mean_batch, else sequence]",
               "gspo": "  [GRPO with one importance ratio per sequence and the GSPO paper's clip range]",
               "simpo": "  [+ token with sft_weight > 0]", "dpo": "  [no reference with reference_free]"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"train": _train, "validate": _validate, "inspect": _inspect, "check": _check, "export": _export,
                "chat": _chat, "plot": _plot, "eval": _eval, "lm-eval-task": _lm_eval_task, "losses": _losses,
                "rollout-server": _rollout_server}
    try:
        return handlers[args.command](args)
    except PosttrainError as exc:
        rank = os.environ.get("RANK")
        where = f" (process {rank})" if rank not in (None, "0") else ""
        print(f"posttrain error{where}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
