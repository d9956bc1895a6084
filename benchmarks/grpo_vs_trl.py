"""GRPO speed: posttrain against TRL's GRPOTrainer on the same online work (issue 7; docs/performance.md).

The built-in `addition` task ("What is a + b? Answer with the number only.", the math reward), the same
model (one safetensors directory), LoRA r=16 / alpha 32 / all linear layers / no dropout, the same prompts
in the same order (TRL with `shuffle_dataset=False`, posttrain with the `sequential` sampler), 4 prompts
per step x 8 completions, 2 prompts (16 completions) per forward/backward, temperature 0.7, top-p 1,
top-k off, and completions forced to full length (`min_new_tokens = max_new_tokens`, 16 tokens) so that
both sides generate and train on the same number of tokens. The loss is the same on both sides (DAPO
token normalisation, clip 0.2, no KL, group-scaled advantages, one update per rollout batch), AdamW at a
constant learning rate. Every configuration runs in its own process, one after the other; both sides'
rendered prompt ids are asserted equal, step by step, and every completion's length is asserted to be
`max_new_tokens`.

Per step: wall time, generation time (the generate call), reward time, and training time = wall -
generation - rewards (everything else: log-prob forwards, backward, optimizer). Generation tokens/s =
completion tokens / generation time; training tokens/s = prompt + completion tokens of every completion /
training time. Protocol: `--steps` steps (10), the first `--drop` (2) dropped, median of `--repeats` (2),
torch.set_num_threads(--threads) in every child, a run flagged `loaded` when other processes used more
than 0.3 of a core during it (benchmarks/common.py).

    python benchmarks/grpo_vs_trl.py                 # every row on SmolLM2-135M-Instruct (see docs)
    python benchmarks/grpo_vs_trl.py --smoke         # a tiny model, 2 steps, one repeat (< 1 minute)
    python benchmarks/grpo_vs_trl.py --rows trl,posttrain_best
    python benchmarks/grpo_vs_trl.py --rows trl,posttrain_best,posttrain_best_vllm,posttrain_best_vllm_server

The vLLM rows (the `vllm` extra) sample with vLLM's kernels, so their completions differ from the hf rows'; they
add the sync time per step (adapter written, loaded and probed) and the largest engine/trainer mismatch
|log pi_old - log pi_engine|. Peak RSS is the trainer process's (vLLM's engine core is a child process).
The `_stale` rows roll out one step ahead (`rollout.max_staleness: 1`): with vLLM the next step's completions are
sampled while this step trains, so its generation time overlaps training and only s/step tells the gain.

    python benchmarks/grpo_vs_trl.py --rows posttrain_best,posttrain_best_stale,posttrain_best_vllm,posttrain_best_vllm_stale
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (LOAD_LIMIT, matmul_peak, model_shape, peak_rss_mb, protocol,  # noqa: E402
                               protocol_parser, read_bandwidth, run_as_child, run_child, run_rows, save_record, tiny_model_dir)

SCRIPT = Path(__file__).resolve()
BEST = {"prefill_once": True, "static_cache": True, "merge_adapters": "auto", "share_prompt": True, "packing": True,
        "gradient_checkpointing": False, "bf16": False}
PLAIN = {"prefill_once": False, "static_cache": False, "merge_adapters": False, "share_prompt": False,
         "packing": False, "gradient_checkpointing": False, "bf16": False}
ROWS = {
    "trl": {"side": "trl", "gradient_checkpointing": False, "bf16": False},
    "posttrain_plain": {"side": "posttrain", **PLAIN},
    "posttrain_best": {"side": "posttrain", **BEST},
    "posttrain_best_without_prefill_once": {"side": "posttrain", **BEST, "prefill_once": False},
    "posttrain_best_without_static_cache": {"side": "posttrain", **BEST, "static_cache": False},
    "posttrain_best_without_merge_adapters": {"side": "posttrain", **BEST, "merge_adapters": False},
    "posttrain_best_without_share_prompt": {"side": "posttrain", **BEST, "share_prompt": False},
    "posttrain_best_without_packing": {"side": "posttrain", **BEST, "packing": False},
    "trl_gradient_checkpointing": {"side": "trl", "gradient_checkpointing": True, "bf16": False},
    "posttrain_best_gradient_checkpointing": {"side": "posttrain", **BEST, "gradient_checkpointing": True},
    "trl_bf16": {"side": "trl", "gradient_checkpointing": False, "bf16": True},
    "posttrain_best_bf16": {"side": "posttrain", **BEST, "bf16": True},
    "posttrain_best_bf16_weights": {"side": "posttrain", **BEST, "bf16": True, "dtype": "bfloat16"},
    "posttrain_best_bf16_weights_merged_adapters": {"side": "posttrain", **BEST, "bf16": True, "dtype": "bfloat16",
                                                    "merge_adapters": True},
    # rollouts from vLLM (issue 13): colocated, and a `posttrain rollout-server` the child starts on loopback
    "posttrain_best_vllm": {"side": "posttrain", **BEST, "engine": "vllm"},
    "posttrain_best_vllm_server": {"side": "posttrain", **BEST, "engine": "vllm_server"},
    # one-step off-policy rollouts (rollout.max_staleness 1): vLLM samples step k+1 while step k trains
    "posttrain_best_vllm_stale": {"side": "posttrain", **BEST, "engine": "vllm", "max_staleness": 1},
    "posttrain_best_stale": {"side": "posttrain", **BEST, "max_staleness": 1},
}
SMOKE_ROWS = ["trl", "posttrain_plain", "posttrain_best"]
GENERATE_ROW = "posttrain_best_without_static_cache"  # sampling with transformers' generate: issue 17's "old path"


def trl_row_for(settings: dict) -> str:
    """The TRL row a posttrain row is compared with: the same gradient checkpointing and precision."""
    if settings["bf16"]:
        return "trl_bf16"
    return "trl_gradient_checkpointing" if settings["gradient_checkpointing"] else "trl"


# ---------------------------------------------------------------------------------------------- children


def _examples(spec: dict) -> list:
    from posttrain.data.prompts import load_prompt_examples

    examples, _ = load_prompt_examples("builtin:addition", split="train", what="benchmark prompts")
    return examples[:spec["steps"] * spec["prompts_per_step"]]


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.rewards.registry import REWARDS

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    examples = _examples(spec)
    reward = REWARDS["math"]()  # the same reward function as posttrain's `rewards: [{name: math}]`
    by_prompt = {ex.prompt: ex for ex in examples}

    def correct(prompts, completions, **kwargs):
        return [reward(c[0]["content"], by_prompt[p[0]["content"]]).score for p, c in zip(prompts, completions)]

    G, N = spec["group_size"], spec["max_new_tokens"]
    micro_prompts = spec["micro_prompts"]
    args = GRPOConfig(output_dir=spec["output_dir"], learning_rate=spec["lr"], lr_scheduler_type="constant",
                      warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                      per_device_train_batch_size=micro_prompts * G,
                      gradient_accumulation_steps=spec["prompts_per_step"] // micro_prompts, num_generations=G,
                      max_completion_length=N, generation_kwargs={"min_new_tokens": N},
                      temperature=spec["temperature"], top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", epsilon=0.2,
                      scale_rewards="group", num_iterations=1, max_steps=spec["steps"], shuffle_dataset=False,
                      gradient_checkpointing=spec["gradient_checkpointing"], bf16=spec["bf16"], fp16=False,
                      use_cpu=True, seed=0, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                      dataloader_num_workers=0, log_completions=False)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": ex.prompt}]} for ex in examples])
    trainer = GRPOTrainer(model=model, reward_funcs=correct, args=args, train_dataset=dataset,
                          processing_class=tokenizer,
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    steps: list[dict] = []
    current: dict = {}

    def timed(name, original, after=None):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            out = original(*args, **kwargs)
            current[name] = current.get(name, 0.0) + time.perf_counter() - started
            if after:
                after(args, out)
            return out
        return wrapper

    def record_prompts(args, out):
        current["prompt_ids"] = [list(map(int, ids)) for ids in out[0]][::G]

    def record_completions(args, out):
        current["completion_lengths"] = [len(ids) for ids in out[0]]
        current["train_tokens"] = sum(len(p) for p in args[0]) + sum(len(c) for c in out[0])

    trainer._tokenize_prompts = timed("tokenize", trainer._tokenize_prompts, record_prompts)
    trainer._generate_single_turn = timed("generation", trainer._generate_single_turn, record_completions)
    trainer._calculate_rewards = timed("rewards", trainer._calculate_rewards)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            current.clear()
            current["started"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"wall": time.perf_counter() - current.pop("started"), **current})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = float(logs["loss"])
                steps[-1]["reward"] = float(logs.get("reward", float("nan")))

    trainer.add_callback(Clock())
    setup_s = time.perf_counter() - t0
    trainer.train()
    return {"steps": steps, "setup_s": setup_s, "peak_rss_mb": peak_rss_mb()}


def posttrain_recipe(spec: dict) -> dict:
    G, N = spec["group_size"], spec["max_new_tokens"]
    return {
        "run": {"output_dir": spec["output_dir"], "seed": 0, "num_threads": spec["threads"]},
        "model": {"name_or_path": spec["model"], "dtype": spec.get("dtype", "float32"), "attn_implementation": "sdpa",
                  "gradient_checkpointing": spec["gradient_checkpointing"]},
        "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": {"builtin": "addition", "split": "train",
                           "num_rows": spec["steps"] * spec["prompts_per_step"]},
                 "heldout": None, "template": "chat"},
        "loss": {"name": "grpo", "params": {"beta": 0.0, "loss_type": "dapo", "epsilon": 0.2,
                                            "scale_rewards": "group"}},
        "rewards": [{"name": "math"}],
        "sampler": {"name": "sequential"},
        "rollout": {"group_size": G, "max_new_tokens": N, "min_new_tokens": N, "temperature": spec["temperature"],
                    "top_p": 1.0, "top_k": 0, "generation_batch_size": spec["prompts_per_step"] * G,
                    "reward_workers": 0, "prefill_once": spec["prefill_once"],
                    "static_cache": spec.get("static_cache", False),
                    "merge_adapters": spec.get("merge_adapters", False), "engine": spec.get("engine", "hf"),
                    "max_staleness": spec.get("max_staleness", 0),
                    "vllm": {"server_url": spec.get("server_url", "http://127.0.0.1:8000"), "kv_cache_gib": 1}},
        "train": {"optimizer": "adamw", "lr": spec["lr"], "lr_scheduler": "constant", "warmup_steps": 0,
                  "batch_size": spec["prompts_per_step"], "micro_batch_size": spec["micro_prompts"],
                  "max_steps": spec["steps"], "max_grad_norm": 1.0, "bf16": spec["bf16"],
                  "share_prompt": spec["share_prompt"], "packing": spec["packing"]},
        "logging": {"progress_bar": False, "report_to": ["jsonl"]},
        "eval": {"at_start": False, "at_end": False},
        "checkpoint": {"every": 0},
    }


def run_posttrain(spec: dict) -> dict:
    """The row's steps; the vLLM rows also report the peak RSS of the engine's own processes (vLLM's engine core,
    or the server), which have ended by then."""
    import resource

    if spec.get("engine") == "vllm_server":
        with rollout_server(spec["model"]) as url:
            out = run_posttrain_steps({**spec, "server_url": url})
    else:
        out = run_posttrain_steps(spec)
    return {**out, "engine_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


@contextlib.contextmanager
def rollout_server(model_dir: str):
    """`posttrain rollout-server` on a free loopback port for the vllm_server row; its URL once it answers."""
    import signal
    import socket
    import subprocess
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "posttrain", "rollout-server", "--model", model_dir, "--port",
                               str(port), "--lora-rank", "16", "--max-model-len", "1024", "--kv-cache-gib", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the rollout server did not start (exit code {server.poll()})")
                time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def run_posttrain_steps(spec: dict) -> dict:
    import torch

    from posttrain.recipe import load_recipe
    from posttrain.trainer import Trainer

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    trainer = Trainer(load_recipe(raw=posttrain_recipe(spec)))
    trainer.setup()
    torch.set_num_threads(spec["threads"])
    setup_s = time.perf_counter() - t0
    trainer.model.train()
    B, steps = spec["prompts_per_step"], []
    for step in range(trainer.plan.total_steps):
        started = time.perf_counter()
        record = trainer.train_step(step)
        wall = time.perf_counter() - started
        prompts = [trainer.train_prompt_ids[(step * B + k) % len(trainer.train_prompt_ids)] for k in range(B)]
        steps.append({"wall": wall, "generation": record["time/generation"], "rewards": record["time/rewards"],
                      "sync": record.get("time/sync", 0.0), "probe_gap": record.get("engine/probe_gap", 0.0),
                      "mismatch_mean": record["mismatch/log_ratio_mean"],
                      "mismatch_max": record["mismatch/log_ratio_abs_max"],
                      "loss": record["loss"], "reward": record["reward/mean"], "prompt_ids": prompts,
                      "completion_lengths": [record["completions/max_length"]],
                      "mean_completion_length": record["completions/mean_length"],
                      "train_tokens": int(record["num_tokens"])})
    trainer.step.close()
    trainer.engine.close()
    return {"steps": steps, "setup_s": setup_s, "peak_rss_mb": peak_rss_mb()}


def run_greedy_check(spec: dict) -> dict:
    """Greedy completions of `spec["prompts"]` distinct training prompts from transformers' generate and from
    posttrain's decode loop with and without merged adapters, on the benchmark's model with a random LoRA adapter
    (B ~ N(0, 0.02)), in fp32 or with bf16 base weights (`spec["dtype"]`, under bf16 autocast): how many equal
    generate's?"""
    import torch

    from posttrain.recipe import load_recipe
    from posttrain.rollout import HFGenerateEngine, SamplingParams
    from posttrain.trainer import Trainer

    torch.set_num_threads(spec["threads"])
    bf16 = spec["dtype"] == "bfloat16"
    trainer = Trainer(load_recipe(raw=posttrain_recipe({**spec, **PLAIN, "bf16": bf16, "steps": spec["prompts"],
                                                         "prompts_per_step": 1, "micro_prompts": 1})))
    trainer.setup()
    model = trainer.peft_model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    prompts = trainer.train_prompt_ids[:spec["prompts"]]
    params = SamplingParams(max_new_tokens=spec["max_new_tokens"], greedy=True)
    device_type = next(model.parameters()).device.type
    outs = {}
    for path, switches in {"generate": {"static_cache": False}, "loop": {"merge_adapters": False},
                           "loop_merged": {"merge_adapters": True}}.items():
        engine = HFGenerateEngine(lambda: model, trainer.pad_id, [trainer.tokenizer.eos_token_id],
                                  batch_size=len(prompts), **switches,
                                  autocast=lambda: torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16))
        outs[path] = [c.token_ids for c in engine.generate(prompts, params)]
    return {"dtype": spec["dtype"], "prompts": len(prompts),
            **{f"{path}_identical": sum(a == b for a, b in zip(outs[path], outs["generate"]))
               for path in ("loop", "loop_merged")}}


CHILDREN = {"trl": run_trl, "posttrain": run_posttrain, "greedy": run_greedy_check}


# ---------------------------------------------------------------------------------------------- parent


def check_same_work(name: str, run: dict, reference: dict, max_new_tokens: int) -> None:
    """Both sides rendered the same prompt ids step by step, and every completion has max_new_tokens tokens."""
    for k, (a, b) in enumerate(zip(run["steps"], reference["steps"])):
        if a["prompt_ids"] != b["prompt_ids"]:
            raise SystemExit(f"{name}, step {k + 1}: other prompt token ids than the first row: the comparison is void")
    for k, step in enumerate(run["steps"]):
        lengths = step["completion_lengths"] + ([step["mean_completion_length"]] if "mean_completion_length" in step
                                                else [])
        if any(length != max_new_tokens for length in lengths):
            raise SystemExit(f"{name}, step {k + 1}: completions of {sorted(set(lengths))} tokens, not forced to "
                             f"{max_new_tokens}: the comparison is void")


def generation_bound_s(settings: dict, completions: int, max_new_tokens: int, shape: dict, probes: dict) -> float:
    """The least time a step's decoding could take here: each of the max_new_tokens decode steps reads every
    weight once (N weights of 4 bytes, 2 with bf16 base weights, at the read-bandwidth probe) and multiplies it
    for every completion (2N FLOPs per token at the matmul probe of the row's precision), whichever is slower;
    the prefill is left out."""
    bf16 = settings.get("bf16", False)
    weight_bytes = shape["N"] * (2 if settings.get("dtype") == "bfloat16" else 4)
    memory = max_new_tokens * weight_bytes / (probes["read_gb_per_s"] * 1e9)
    compute = completions * max_new_tokens * 2 * shape["N"] / (probes["matmul_bf16_gflops" if bf16 else
                                                                      "matmul_fp32_gflops"] * 1e9)
    return max(memory, compute)


def summarise(name: str, settings: dict, repeats: list[dict], drop: int, completions_per_step: int,
              max_new_tokens: int, bound_s: float) -> dict:
    per_repeat = []
    for run in repeats:
        kept = run["steps"][drop:]
        wall = sum(s["wall"] for s in kept)
        generation = sum(s["generation"] for s in kept)
        rewards = sum(s["rewards"] for s in kept)
        overlapped = settings.get("max_staleness") and settings.get("engine", "hf") != "hf"
        train = float("nan") if overlapped else wall - generation - rewards  # generation ran beside training
        gen_tokens = len(kept) * completions_per_step * max_new_tokens
        train_tokens = sum(s["train_tokens"] for s in kept)
        per_repeat.append({"s_per_step": wall / len(kept), "generation_s_per_step": generation / len(kept),
                           "sync_s_per_step": sum(s.get("sync", 0.0) for s in kept) / len(kept),
                           "mismatch_mean": max(abs(s.get("mismatch_mean", 0.0)) for s in kept),
                           "mismatch_max": max(s.get("mismatch_max", 0.0) for s in kept),
                           "rewards_s_per_step": rewards / len(kept), "train_s_per_step": train / len(kept),
                           "generation_tokens_per_s": gen_tokens / generation, "train_tokens_per_s": train_tokens / train,
                           "peak_rss_mb": run["peak_rss_mb"], "engine_peak_rss_mb": run.get("engine_peak_rss_mb", 0.0),
                           "load_average": run["load"]["load_average"],
                           "other_cpu": run["load"]["other_cpu"], "losses": [s["loss"] for s in run["steps"]],
                           "rewards": [s["reward"] for s in run["steps"]]})
    keys = ("s_per_step", "generation_s_per_step", "rewards_s_per_step", "train_s_per_step",
            "generation_tokens_per_s", "train_tokens_per_s", "peak_rss_mb", "engine_peak_rss_mb", "sync_s_per_step",
            "mismatch_mean", "mismatch_max")
    median = {key: statistics.median(r[key] for r in per_repeat) for key in keys}
    median["generation_share_of_bound"] = bound_s / median["generation_s_per_step"]
    others = [r["other_cpu"] for r in per_repeat]
    return {"name": name, "settings": settings, **median, "generation_bound_s": bound_s,
            "losses": per_repeat[0]["losses"],
            "rewards": per_repeat[0]["rewards"], "load_averages": [r["load_average"] for r in per_repeat],
            "other_cpu": others, "loaded": any(x > LOAD_LIMIT for x in others), "repeats": per_repeat}


def print_table(rows: list[dict]) -> None:
    head = ("| row | s/step | generation s | share of bound | sync s | rewards s | training s | generation tok/s "
            "| training tok/s | peak RSS MB (engine) | s/step: TRL / this | compared with "
            f"| generation: {GENERATE_ROW} / this | max mismatch | other load |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        ratio = r.get("vs_trl", {})
        speedup = f"{ratio['speedup']:.2f}x" if ratio else "-"
        generation = (f"{r['generation_speedup_vs_generate']:.2f}x" if "generation_speedup_vs_generate" in r
                      else "-")
        engine_rss = f" ({r['engine_peak_rss_mb']:.0f})" if r["settings"].get("engine", "hf") != "hf" else ""
        print(f"| {r['name']} | {r['s_per_step']:.2f} | {r['generation_s_per_step']:.2f} "
              f"| {r['generation_share_of_bound']:.0%} | {r['sync_s_per_step']:.3f} | {r['rewards_s_per_step']:.3f} "
              f"| {r['train_s_per_step']:.2f} | {r['generation_tokens_per_s']:.1f} "
              f"| {r['train_tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f}{engine_rss} "
              f"| {speedup} | {ratio.get('row', '-')} | {generation} | {r['mismatch_max']:.2g} "
              f"| {max(r['other_cpu']):.2f}{' (loaded)' if r['loaded'] else ''} |")


def main() -> None:
    parser = protocol_parser(__doc__.split("\n\n")[0], ROWS, full_steps=10, smoke_steps=2, out_name="grpo_vs_trl")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--micro-prompts", type=int, default=2, help="prompts (groups) per forward/backward")
    parser.add_argument("--group-size", type=int, default=None, help="default 8; smoke 4")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 16; smoke 4")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()
    if run_as_child(args, CHILDREN):
        return
    steps, drop, repeats, names = protocol(args, ROWS, SMOKE_ROWS)
    args.group_size = args.group_size or (4 if args.smoke else 8)
    args.max_new_tokens = args.max_new_tokens or (4 if args.smoke else 16)
    if args.prompts_per_step % args.micro_prompts:
        raise SystemExit("--prompts-per-step must be a multiple of --micro-prompts")
    from posttrain.models import resolve_model_path

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = str(tiny_model_dir(workdir)) if args.smoke else resolve_model_path(args.model)
        base = {"model": model_dir, "steps": steps, "prompts_per_step": args.prompts_per_step,
                "micro_prompts": args.micro_prompts, "group_size": args.group_size,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "lr": args.lr,
                "threads": args.threads}
        probes = {"matmul_fp32_gflops": matmul_peak(args.threads),
                  "matmul_bf16_gflops": matmul_peak(args.threads, "bfloat16"), "read_gb_per_s": read_bandwidth(args.threads)}
        shape = model_shape(model_dir)
        print(f"probes on {args.threads} threads: matmul fp32 {probes['matmul_fp32_gflops']:.1f}, bf16 "
              f"{probes['matmul_bf16_gflops']:.1f} GFLOP/s, memory read {probes['read_gb_per_s']:.1f} GB/s; load "
              f"average {os.getloadavg()[0]:.2f}", flush=True)

        def spec_for(name, settings, k):
            return {**base, **{key: v for key, v in settings.items() if key != "side"},
                    "output_dir": str(workdir / f"{name}-{k}")}

        def describe(run):
            kept = run["steps"][drop:]
            return f"{sum(s['wall'] for s in kept) / len(kept):.2f} s/step"

        results = run_rows(SCRIPT, names, ROWS, repeats, spec_for, describe)
        greedy = [run_child(SCRIPT, "greedy", {**base, "prompts": 32, "dtype": dtype,
                                               "output_dir": str(workdir / f"greedy-{dtype}")})[0]
                  for dtype in ("float32", "bfloat16")]
        for check in greedy:
            print(f"greedy completions against generate's ({check['dtype']} base weights, random adapter): decode "
                  f"loop {check['loop_identical']} of {check['prompts']} identical, with merged adapters "
                  f"{check['loop_merged_identical']}", flush=True)
    first = results[names[0]][1][0]
    for name, (_, runs) in results.items():
        for run in runs:
            check_same_work(name, run, first, args.max_new_tokens)

    completions = args.prompts_per_step * args.group_size
    rows = [summarise(n, s, r, drop, completions, args.max_new_tokens,
                      generation_bound_s(s, completions, args.max_new_tokens, shape, probes))
            for n, (s, r) in results.items()]
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        if r["settings"]["side"] == "posttrain" and trl_row_for(r["settings"]) in by_name:
            trl = by_name[trl_row_for(r["settings"])]
            r["vs_trl"] = {"row": trl["name"], "speedup": trl["s_per_step"] / r["s_per_step"],
                           "generation_speedup": trl["generation_s_per_step"] / r["generation_s_per_step"],
                           "train_speedup": trl["train_s_per_step"] / r["train_s_per_step"],
                           "peak_rss_mb": r["peak_rss_mb"] / trl["peak_rss_mb"]}
        if r["settings"]["side"] == "posttrain" and GENERATE_ROW in by_name:
            r["generation_speedup_vs_generate"] = (by_name[GENERATE_ROW]["generation_s_per_step"]
                                                   / r["generation_s_per_step"])
    print()
    print_table(rows)
    save_record(args, probes,
                {"steps": steps, "dropped_steps": drop, "repeats": repeats, "prompts_per_step": args.prompts_per_step,
                 "micro_prompts": args.micro_prompts, "group_size": args.group_size,
                 "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens,
                 "temperature": args.temperature, "lr": args.lr,
                 "model": args.model if not args.smoke else "tiny random Llama (SmolLM2 tokenizer)",
                 "task": "builtin:addition/train", "reward": "math",
                 "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}}, rows,
                greedy_check=greedy)


if __name__ == "__main__":
    main()
