"""Command line: `posttrain train RECIPE.yaml [--set key=value ...] [--resume] [--force]`,
`posttrain eval ...`, `posttrain validate RECIPE.yaml`, `posttrain losses`.

Also runs as `accelerate launch -m posttrain train RECIPE.yaml`. A user mistake (bad recipe, data,
path) prints one paragraph and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

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

    validate = sub.add_parser("validate", help="check a recipe without loading any model")
    validate.add_argument("recipe")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    ev = sub.add_parser("eval", help="ranking accuracy of a model or adapter on preference pairs")
    ev.add_argument("--model", default="smollm2-135m-instruct", help="model id, directory or alias")
    ev.add_argument("--adapter", default=None, help="a peft adapter directory (e.g. a run's final/)")
    ev.add_argument("--data", default=None, help="preference data file or datasets directory")
    ev.add_argument("--builtin", default=None, help="a built-in task instead of --data (split heldout)")
    ev.add_argument("--format", dest="template", choices=["plain", "chat"], default="plain")
    ev.add_argument("--max-pairs", type=int, default=None)
    ev.add_argument("--max-length", type=int, default=512)
    ev.add_argument("--batch-size", type=int, default=16)

    sub.add_parser("losses", help="list the registered losses and their parameters")
    return parser


def _train(args) -> int:
    from posttrain.config import load_recipe
    from posttrain.trainer import Trainer

    recipe = load_recipe(args.recipe, args.overrides)
    Trainer(recipe, args.recipe, resume=args.resume, force=args.force).train()
    return 0


def _validate(args) -> int:
    from posttrain.config import load_recipe

    load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: valid")
    return 0


def _eval(args) -> int:
    import torch

    from posttrain.config import DataConfig, DataSource
    from posttrain.core import PolicyLogProbs
    from posttrain.data.sources import load_pairs
    from posttrain.eval.ranking import score_pairs
    from posttrain.models import load_causal_lm, load_tokenizer

    if (args.data is None) == (args.builtin is None):
        raise PosttrainError("posttrain eval: give exactly one of --data PATH or --builtin TASK.")
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    if args.adapter:
        import peft

        model = peft.PeftModel.from_pretrained(model, args.adapter)
    source = DataSource(path=args.data, builtin=args.builtin, split="heldout" if args.builtin else "train",
                        limit=args.max_pairs)
    data_cfg = DataConfig(train=source, template=args.template, max_length=args.max_length, invalid_rows="skip")
    pairs, _, _ = load_pairs(source, data_cfg, tokenizer, what="eval data")
    with torch.no_grad():
        scores = score_pairs(PolicyLogProbs(model), pairs, tokenizer.pad_token_id, args.batch_size, progress=True)
    print(f"pairs: {len(scores)}  format: {args.template}")
    print(f"ranking accuracy R: {scores.ranking_accuracy():.4f}")
    print(f"length-normalised ranking accuracy R~: {scores.normalised_ranking_accuracy():.4f}")
    return 0


def _losses(_args) -> int:
    import dataclasses

    from posttrain.losses import LOSSES

    for name, cls in sorted(LOSSES.items()):
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Params))
        print(f"{name:12s} level={cls.level:9s} reference={'yes' if cls.needs_reference else 'no':3s}  {fields}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"train": _train, "validate": _validate, "eval": _eval, "losses": _losses}
    try:
        return handlers[args.command](args)
    except PosttrainError as exc:
        rank = os.environ.get("RANK")
        where = f" (process {rank})" if rank not in (None, "0") else ""
        print(f"posttrain error{where}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
