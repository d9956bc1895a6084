"""Ranking accuracy of untrained SmolLM2-135M-Instruct on HH-RLHF helpful-base, and scoring speed.

1. Speed: on the same pairs, in the same run, at each of --speed-threads torch thread counts, pairs/s of
   - one sequence at a time (`layout="separate", batch_size=1`: one forward per prompt + response),
   - batched, one row per sequence (`layout="separate"`, sorted by length), and
   - batched, one row per pair with the prompt computed once (`layout="shared"`, the default).
   The methods are interleaved over several rounds so that a change in the machine's load hits all
   of them alike; the scores of the three methods are compared too.
2. Accuracy: R and R~ with 95% bootstrap intervals on a seeded random sample of valid pairs (plain
   format, `prompt + response` as Chen et al. scored), plus R*, the alignment gap and the difficulty
   with the model as its own reference (it is untrained).

Writes benchmarks/results/eval_hh_smollm2.json and the plots (PNG) next to it. The full report,
with per-pair texts, goes to --report-dir outside the repository (the data is not copied into it).

    python benchmarks/eval_hh_smollm2.py                       # the full run (1,000 pairs)
    python benchmarks/eval_hh_smollm2.py --pairs 50 --speed-pairs 8 --rounds 1 --speed-threads 1   # quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posttrain.config import DataConfig, DataSource  # noqa: E402
from posttrain.core import PolicyLogProbs  # noqa: E402
from posttrain.data.sources import load_pairs  # noqa: E402
from posttrain.eval.api import build_report  # noqa: E402
from posttrain.eval.ranking import score_pairs  # noqa: E402
from posttrain.eval.report import write_report  # noqa: E402
from posttrain.models import load_causal_lm, load_tokenizer  # noqa: E402
from posttrain.runtime import package_versions  # noqa: E402

HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl"

# Chen et al. 2024, Tables 2-4, HH-RLHF test split (R~ / R, in %), 1,000 random pairs each.
PAPER_HH_TEST = {"GPT2": (49.9, 46.0), "Pythia-2.8B": (51.0, 46.4), "Llama-2-7B": (52.1, 46.3),
                 "Llama-2-7B-chat": (52.0, 46.2), "Mistral-7B-v0.1": (52.9, 45.8), "Zephyr-7B-SFT": (49.5, 46.2),
                 "Zephyr-7B-DPO": (50.9, 46.5), "Gemma-7B-IT": (52.5, 46.7)}


def speed(model, pairs, pad_id: int, batch_size: int, rounds: int, max_padding: float) -> dict:
    methods = {"one_sequence_at_a_time": ("separate", 1), "batched_separate_rows": ("separate", batch_size),
               "batched_shared_prompt": ("shared", batch_size)}
    totals = {name: {"pairs": 0, "seconds": 0.0, "rounds": []} for name in methods}
    scores = {}
    for r in range(rounds):
        for name, (layout, bs) in methods.items():
            s = score_pairs(model, pairs, pad_id, bs, layout=layout, max_padding=max_padding if bs > 1 else None)
            totals[name]["pairs"] += s.stats.pairs
            totals[name]["seconds"] += s.stats.seconds
            totals[name]["rounds"].append(s.stats.to_dict())
            scores[name] = s
            print(f"round {r + 1} {name}: {s.stats.pairs_per_second:.3f} pairs/s "
                  f"(padding {100 * s.stats.padding_share:.1f}%)", flush=True)
    for t in totals.values():
        t["pairs_per_second"] = t["pairs"] / t["seconds"]
    # For information only (not the same numbers): bfloat16 autocast, which AMX-capable CPUs run much faster.
    bf16 = score_pairs(model, pairs, pad_id, batch_size, layout="shared", max_padding=max_padding, autocast_bf16=True)
    ref32 = scores["batched_shared_prompt"]
    extra = {"batched_shared_prompt_bf16_autocast": {
        **bf16.stats.to_dict(),
        "max_relative_difference_vs_fp32": float(torch.cat([
            (bf16.chosen_logps - ref32.chosen_logps).abs() / ref32.chosen_logps.abs(),
            (bf16.rejected_logps - ref32.rejected_logps).abs() / ref32.rejected_logps.abs()]).max()),
        "R_agreement_with_fp32": float(((bf16.chosen_logps >= bf16.rejected_logps)
                                        == (ref32.chosen_logps >= ref32.rejected_logps)).double().mean())}}
    print(f"bf16 autocast (information): {bf16.stats.pairs_per_second:.3f} pairs/s", flush=True)
    base = totals["one_sequence_at_a_time"]["pairs_per_second"]
    ref = scores["one_sequence_at_a_time"]
    agreement = {}
    for name, s in scores.items():
        diff = torch.cat([(s.chosen_logps - ref.chosen_logps).abs() / ref.chosen_logps.abs(),
                          (s.rejected_logps - ref.rejected_logps).abs() / ref.rejected_logps.abs()])
        agreement[name] = float(diff.max())
    return {"pairs": len(pairs), "rounds": rounds, "batch_size": batch_size, "max_padding": max_padding,
            "methods": totals,
            "speedup_vs_one_at_a_time": {name: t["pairs_per_second"] / base for name, t in totals.items()},
            "max_relative_difference_vs_one_at_a_time": agreement, "not_comparable": extra,
            "mean_tokens": {"prompt": float(np.mean([len(p.prompt_ids) for p in pairs])),
                            "chosen": float(np.mean([len(p.chosen_ids) for p in pairs])),
                            "rejected": float(np.mean([len(p.rejected_ids) for p in pairs]))}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--speed-pairs", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-padding", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the accuracy run")
    parser.add_argument("--speed-threads", default="1,2", help="thread counts to measure the speed at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_hh_smollm2.json"))
    parser.add_argument("--report-dir", default="/tmp/eval_hh_smollm2_report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = PolicyLogProbs(load_causal_lm("smollm2-135m-instruct", "float32")).eval()
    source = DataSource(path=str(HH), format="hh")
    pairs, stats, invalid = load_pairs(source, DataConfig(train=source, template="plain", max_length=args.max_length,
                                                          invalid_rows="skip"), tokenizer, what="HH-RLHF helpful-base")
    valid = len(pairs)
    index = sorted(random.Random(args.seed).sample(range(valid), min(args.pairs, valid)))
    sample = [pairs[i] for i in index]
    speed_index = sorted(random.Random(args.seed + 1).sample(range(len(sample)), min(args.speed_pairs, len(sample))))
    result = {"benchmark": "eval_hh_smollm2", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "inputs": {"model": "smollm2-135m-instruct (float32, dequantised Q4_1 GGUF)", "data": str(HH.relative_to(
                  ROOT.parent)), "format": "plain", "max_length": args.max_length, "valid_pairs": valid,
                  "invalid_rows_skipped": len(invalid), "sampled_pairs": len(sample), "seed": args.seed,
                  "truncated_in_sample": int(sum(p.truncated for p in sample)), "torch_threads": args.threads,
                  "machine": platform.processor() or platform.machine(), "packages": package_versions()}}
    result["speed"] = {}
    for threads in [int(t) for t in args.speed_threads.split(",") if t.strip()]:
        torch.set_num_threads(threads)
        print(f"speed: {len(speed_index)} pairs, {args.rounds} rounds, batch size {args.batch_size}, "
              f"{threads} threads", flush=True)
        result["speed"][f"threads_{threads}"] = speed(model, [sample[i] for i in speed_index], tokenizer.pad_token_id,
                                                      args.batch_size, args.rounds, args.max_padding)
        print(json.dumps(result["speed"][f"threads_{threads}"]["speedup_vs_one_at_a_time"], indent=1), flush=True)
    torch.set_num_threads(args.threads)
    if not args.skip_accuracy:
        scores = score_pairs(model, sample, tokenizer.pad_token_id, args.batch_size, progress=True,
                             max_padding=args.max_padding)
        inputs = {"model": "smollm2-135m-instruct", "adapter": None, "reference": "the model itself (untrained)",
                  "data": result["inputs"]["data"], "format": "plain", "max_length": args.max_length,
                  "alpha_source": "alpha = 1 for every pair (HH-RLHF has no votes)", "sample": len(sample),
                  "excluded": {"invalid_rows": len(invalid), "not_sampled": valid - len(sample)}}
        report, records = build_report(sample, scores, scores, None, inputs, betas=[0.01, 0.1, 1.0, 5.0, 10.0],
                                       eps=1e-3, tie_threshold=0.01, dpo_beta=0.1, bootstrap=args.bootstrap,
                                       seed=args.seed, reference_is_policy=True, tokenizer=tokenizer)
        files = write_report(args.report_dir, report, records)
        m = report["metrics"]
        result["accuracy"] = {
            "R": m["ranking_accuracy"], "R_ci95": m["ranking_accuracy_ci95"],
            "R_normalised": m["ranking_accuracy_normalised"],
            "R_normalised_ci95": m["ranking_accuracy_normalised_ci95"],
            "R_star": m["idealised"]["R_star"], "R_star_summary": m["idealised"]["R_star_summary"],
            "R_star_normalised_summary": m["idealised"]["R_star_normalised_summary"],
            "alignment_gap": m["alignment_gap"], "alignment_gap_normalised": m["alignment_gap_normalised"],
            "eps_sensitivity": m["eps_sensitivity"], "difficulty": m["difficulty"],
            "length_split": m["length_split"], "logps": m["logps"], "scoring": report["scoring"]}
        result["paper_hh_test_R_normalised_R_percent"] = PAPER_HH_TEST
        plots = Path(args.out).with_suffix("")
        plots.mkdir(parents=True, exist_ok=True)
        for key in ("ranking_vs_beta", "difficulty"):
            if key in files:
                shutil.copy(files[key], plots / Path(files[key]).name)
        print(f"R = {m['ranking_accuracy']:.4f} {m['ranking_accuracy_ci95']}  "
              f"R~ = {m['ranking_accuracy_normalised']:.4f} {m['ranking_accuracy_normalised_ci95']}", flush=True)
    result["seconds"] = time.time() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
