"""Claim (VADE, spec section 9): on a pool that mixes prompts the policy always solves with prompts it never solves,
sampling prompts by their estimated reward variance wastes fewer groups on zero variance than uniform sampling, and
training on the informative groups raises held-out pass@1 at least as fast (issue 15, item 4).

Set-up, fixed before the full run (the earlier run, G = 4 on addition alone, is in docs/results.md):
- GRPO recipe of `recipes/grpo_smollm2_addition.yaml` (SmolLM2-135M-Instruct, LoRA, DAPO-style GRPO, bf16 autocast,
  the `math` reward, temperature 0.7, 16 new tokens), with G = 8 and 4 prompts a step.
- the pool: 16 prompts of the built-in `addition` task (operands 1-40; untrained greedy pass@1 about 0.31) and 16 of
  `two_digit_addition` (operands 10-99; about 0.10), drawn with seed 0 from their training splits, in one prompt file.
- 80 steps: 320 draws over 32 prompts, 10 per prompt on average.
- held-out: 100 prompts of each task's held-out split; greedy pass@1 every 20 steps, per task and together.
- VADE (lambda1 0.2, lambda2 0.999, success = `math` reward at least 0.5) against uniform (a seeded permutation per
  epoch), seeds 0, 1, 2, the same for both samplers.
- reported: the share of groups with zero reward variance over training (all, and per task), held-out pass@1 over
  steps; mean and standard error over seeds.
- every finished run is saved at once: the same command with the same --out goes on where it stopped.

    python benchmarks/claims/vade_vs_uniform.py --threads 1   # full: 6 runs of 80 steps
    python benchmarks/claims/vade_vs_uniform.py --smoke       # tiny model, a few steps (CI)
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import yaml

from _harness import ROOT, mean_se, merge, online_smoke, parse_args, save, table

from posttrain.data.tasks import builtin_rows
from posttrain.recipe import load_recipe
from posttrain.trainer import Trainer

RECIPE = ROOT / "recipes" / "grpo_smollm2_addition.yaml"
SAMPLERS = ("uniform", "vade")
TASKS = ("addition", "two_digit_addition")
FULL = {"pool_per_task": 16, "heldout_per_task": 100, "steps": 80, "eval_every": 20, "seeds": (0, 1, 2)}
SMOKE = {"pool_per_task": 4, "heldout_per_task": 4, "steps": 3, "eval_every": 2, "seeds": (0,)}


def write_prompts(path: Path, split: str, per_task: int) -> list[str]:
    """`per_task` prompts of each task as a prompt_answer file; the task of each row, in row order."""
    tasks = []
    with path.open("w") as handle:
        for task in TASKS:
            for row in builtin_rows(task, split, per_task, seed=0):
                handle.write(json.dumps({"prompt": row.prompt, "answer": row.chosen}) + "\n")
                tasks.append(task)
    return tasks


def run_one(raw: dict, pool_tasks: list[str], heldout_tasks: list[str]) -> dict:
    started = time.time()
    Trainer(load_recipe(raw=raw), force=True).train()
    out = Path(raw["run"]["output_dir"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "reward/mean" in m]
    rewards_of: dict[tuple[int, int], list[float]] = {}  # (step, group) -> its completions' rewards
    task_of: dict[tuple[int, int], str] = {}
    for line in (out / "completions.jsonl").read_text().splitlines():
        rollout = json.loads(line)
        key = (rollout["step"], rollout["group"])
        rewards_of.setdefault(key, []).append(rollout["reward"])
        task_of[key] = pool_tasks[rollout["prompt_index"]]
    zero = {task: [] for task in TASKS}
    for key, rewards in rewards_of.items():
        zero[task_of[key]].append(float(max(rewards) == min(rewards)))
    heldout = []
    for path in sorted((out / "eval").glob("greedy-step-*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        per_task = {task: [r["success"] for r in rows if heldout_tasks[r["row"] - 1] == task] for task in TASKS}
        heldout.append({"step": int(path.stem.rsplit("-", 1)[1]), "pass@1": sum(r["success"] for r in rows) / len(rows),
                        **{f"pass@1/{task}": sum(v) / len(v) for task, v in per_task.items()}})
    return {"zero_variance_share": sum(m["groups/zero_variance_share"] for m in steps) / len(steps),
            "zero_variance_share_by_task": {task: sum(v) / len(v) if v else None for task, v in zero.items()},
            "groups_by_task": {task: len(v) for task, v in zero.items()},
            "zero_variance_by_step": [m["groups/zero_variance_share"] for m in steps],
            "train_pass@1": sum(m["pass@1"] for m in steps) / len(steps), "heldout": heldout,
            "steps": len(steps), "wall_seconds": time.time() - started}


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in SAMPLERS:
        by_step = list(zip(*[r["zero_variance_by_step"] for r in runs[name]]))
        window = 10
        smooth = [sum(sum(s) / len(s) for s in by_step[max(0, i - window + 1):i + 1]) / min(i + 1, window)
                  for i in range(len(by_step))]
        left.plot(range(1, len(smooth) + 1), smooth, label=name)
        points = list(zip(*[r["heldout"] for r in runs[name]]))
        right.errorbar([p[0]["step"] for p in points], [mean_se([q["pass@1"] for q in p])[0] for p in points],
                       yerr=[mean_se([q["pass@1"] for q in p])[1] for p in points], marker="o", capsize=3, label=name)
    left.set(xlabel="step", ylabel="zero-variance share of groups", title="zero-variance groups (10-step mean)",
             ylim=(0, 1))
    right.set(xlabel="step", ylabel="held-out greedy pass@1", title="held-out pass@1 (mean +- s.e. over seeds)")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    sizes = SMOKE if args.smoke else FULL
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="claims-vade-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pool_tasks = write_prompts(workdir / "pool.jsonl", "train", sizes["pool_per_task"])
    heldout_tasks = write_prompts(workdir / "heldout.jsonl", "heldout", sizes["heldout_per_task"])
    base = yaml.safe_load(RECIPE.read_text())
    source = {"format": "prompt_answer"}
    base = merge(base, data={**base["data"], "train": {**source, "path": str(workdir / "pool.jsonl")},
                             "heldout": {**source, "path": str(workdir / "heldout.jsonl")}},
                 rollout={**base["rollout"], "group_size": 8},
                 train={"batch_size": 4, "micro_batch_size": 2, "max_steps": sizes["steps"]},
                 logging={"progress_bar": not args.smoke, "report_to": ["jsonl"], "completions": True},
                 eval={**base["eval"], "every": sizes["eval_every"], "report": True}, checkpoint={"every": 0})
    if args.smoke:
        base = online_smoke(base, workdir, sizes["steps"])
        base = merge(base, data={**base["data"], "train": {**source, "path": str(workdir / "pool.jsonl")},
                                 "heldout": {**source, "path": str(workdir / "heldout.jsonl")}})
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"vade_vs_uniform{'_smoke' if args.smoke else ''}.json")
    done = json.loads(out.read_text()).get("runs", {}) if out.is_file() else {}
    runs: dict[str, list[dict]] = {name: [] for name in SAMPLERS}
    for seed in sizes["seeds"]:
        for name in SAMPLERS:
            finished = [r for r in done.get(name, []) if r.get("seed") == seed]
            if finished:  # the same command goes on where an interrupted run stopped
                runs[name].append(finished[0])
                continue
            raw = merge(base, run={"output_dir": str(workdir / f"{name}_{seed}"), "seed": seed,
                                   "num_threads": args.threads},
                        sampler={"name": name, "success_threshold": 0.5})
            runs[name].append({"seed": seed, **run_one(raw, pool_tasks, heldout_tasks)})
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"partial": True, "sizes": sizes, "runs": runs}, indent=2))
            last = runs[name][-1]
            print(f"{name} seed {seed}: zero-variance share {last['zero_variance_share']:.3f}, held-out pass@1 "
                  f"{last['heldout'][0]['pass@1']:.3f} -> {last['heldout'][-1]['pass@1']:.3f}", flush=True)
    rows, result = [], {"claim": "VADE wastes fewer groups on zero reward variance than uniform sampling",
                        "sizes": sizes, "tasks": TASKS, "group_size": 8, "prompts_per_step": 4, "runs": runs}
    for name in SAMPLERS:
        zv = mean_se([r["zero_variance_share"] for r in runs[name]])
        by_task = {task: mean_se([r["zero_variance_share_by_task"][task] for r in runs[name]]) for task in TASKS}
        final = mean_se([r["heldout"][-1]["pass@1"] for r in runs[name]])
        result[name] = {"zero_variance_share": zv, "zero_variance_share_by_task": by_task, "heldout_pass@1_end": final,
                        "heldout_pass@1_start": mean_se([r["heldout"][0]["pass@1"] for r in runs[name]])}
        rows.append([name, f"{zv[0]:.3f} +- {zv[1]:.3f}",
                     *(f"{by_task[task][0]:.3f} +- {by_task[task][1]:.3f}" for task in TASKS),
                     f"{result[name]['heldout_pass@1_start'][0]:.3f}", f"{final[0]:.3f} +- {final[1]:.3f}"])
    gap = result["uniform"]["zero_variance_share"][0] - result["vade"]["zero_variance_share"][0]
    se = math.hypot(result["uniform"]["zero_variance_share"][1], result["vade"]["zero_variance_share"][1])
    result["zero_variance_reduction"] = {"points": 100 * gap, "se_points": 100 * se, "holds": gap > 2 * se}
    out = save(args, "vade_vs_uniform", result)
    print(table(["sampler", "zero-variance share", *(f"zero-var. {t}" for t in TASKS), "held-out pass@1 start",
                 "held-out pass@1 end"], rows))
    print(f"VADE - uniform zero-variance share: {-100 * gap:+.1f} points (s.e. {100 * se:.1f}): "
          f"{'holds (more than 2 s.e.)' if gap > 2 * se else 'not shown'}")
    plot(runs, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
