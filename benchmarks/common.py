"""What the speed benchmarks share: child processes with a measure of the machine's other load, a matmul
probe, peak RSS, and the smoke mode's tiny model.

The 1-minute load average before a run is recorded, but right after the previous child it still holds
that child's decaying load (about 2 on two busy threads), so it cannot tell whether something else was
running. A run is flagged `loaded` instead from what the kernel counts: the CPU time every process used
during the run (/proc/stat, busy jiffies) minus the CPU time of the child itself and of this parent,
divided by the run's wall time; above `LOAD_LIMIT` (0.3 of a core) the numbers are doubtful.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOAD_LIMIT = 0.3


def peak_rss_mb() -> float:
    """This process's peak resident memory (getrusage; KiB on Linux), model load included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _busy_cpu_seconds() -> float:
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_child(script: Path, kind: str, spec: dict) -> tuple[dict, dict]:
    """Run `script --child KIND SPEC` in a fresh process; return its JSON (last stdout line) and the load:
    {"load_average": 1-minute average before, "other_cpu": cores used by other processes during the run}."""
    load_average = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(spec["threads"]),
           "TOKENIZERS_PARALLELISM": "false"}
    busy, own, started = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), "--child", kind, json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    other = max(0.0, (_busy_cpu_seconds() - busy) - (_own_cpu_seconds() - own)) / wall
    if proc.returncode != 0:
        raise SystemExit(f"child {kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), {"load_average": load_average, "other_cpu": other}


def matmul_peak(threads: int, dtype: str = "float32", size: int = 1024, seconds: float = 2.0) -> float:
    """Matmul GFLOP/s of this machine now: the best of repeated size x size products."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(size, size, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, dtype=getattr(torch, dtype))
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        a @ b
        best = max(best, 2 * size ** 3 / (time.perf_counter() - started))
    return best / 1e9


def model_shape(model_dir: str) -> dict:
    """N (weights used in matmuls, LoRA r=16 on every linear layer included), layers and attention width."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    d, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or d // heads
    q, kvw = heads * head_dim, kv * head_dim
    linear = [(d, q), (d, kvw), (d, kvw), (q, d), (d, f), (d, f), (f, d)]
    per_layer = sum(i * o for i, o in linear)
    lora = sum(16 * (i + o) for i, o in linear)
    N = layers * (per_layer + lora) + d * config["vocab_size"]  # + output layer
    return {"N": N, "layers": layers, "d_attn": q}


def read_bandwidth(threads: int, megabytes: int = 1024, seconds: float = 2.0) -> float:
    """GB/s of reading memory now: the best of repeated sums over a float32 tensor far larger than the caches."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(megabytes * 2 ** 20 // 4, dtype=torch.float32)
    x.sum()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - started))
    return best / 1e9


def tiny_model_dir(workdir: Path) -> Path:
    """A small random Llama with the real SmolLM2 tokenizer and chat template (the smoke modes' model)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from posttrain.models import ensure_smollm2_cached

    directory = workdir / "tiny-model"
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_smollm2_cached()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------- protocol
def protocol_parser(description: str, rows: dict, full_steps: int, smoke_steps: int, out_name: str):
    """The options every speed benchmark has: --smoke, --steps, --drop, --repeats, --rows, --threads, --model,
    --out (and the hidden --child)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps, one repeat (< 1 minute)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimiser steps per run (default {full_steps}; smoke {smoke_steps})")
    parser.add_argument("--drop", type=int, default=None, help="first steps left out of s/step (default 2; smoke 1)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per row (default 2; smoke 1)")
    parser.add_argument("--rows", default=None, help=f"comma-separated subset of: {', '.join(rows)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model directory or posttrain alias")
    parser.add_argument("--out", default=None,
                        help=f"JSON path (default benchmarks/results/{out_name}[_smoke].json)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    parser.set_defaults(full_steps=full_steps, smoke_steps=smoke_steps, out_name=out_name)
    return parser


def run_as_child(args, children: dict) -> bool:
    """In a child process (--child KIND SPEC): run it, print its JSON, and say so."""
    if not args.child:
        return False
    kind, spec = args.child
    print(json.dumps(children[kind](json.loads(spec))))
    return True


def protocol(args, rows: dict, smoke_rows: list[str]) -> tuple[int, int, int, list[str]]:
    """(steps, dropped steps, repeats, row names) from the options, smoke mode's defaults included."""
    steps = args.steps or (args.smoke_steps if args.smoke else args.full_steps)
    drop = args.drop if args.drop is not None else (1 if args.smoke else 2)
    repeats = args.repeats or (1 if args.smoke else 2)
    names = args.rows.split(",") if args.rows else (smoke_rows if args.smoke else list(rows))
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows: {', '.join(rows)}")
    if not args.smoke and steps < args.full_steps:
        print(f"note: {steps} steps is below the protocol's {args.full_steps}")
    return steps, drop, repeats, names


def run_rows(script: Path, names: list[str], rows: dict, repeats: int, spec_for, describe) -> dict:
    """Every row's repeats, one child process after the other: {name: (settings, [run, ...])}, each run with its
    "load". `spec_for(name, settings, repeat)` is the child's spec; `describe(run)` a progress line."""
    results = {}
    for name in names:
        settings, runs = rows[name], []
        for k in range(repeats):
            run, load = run_child(script, settings["side"], spec_for(name, settings, k))
            run["load"] = load
            runs.append(run)
            print(f"{name}: {describe(run)}, peak RSS {run['peak_rss_mb']:.0f} MB, other load "
                  f"{load['other_cpu']:.2f} cores", flush=True)
        results[name] = (settings, runs)
    return results


def save_record(args, machine: dict, protocol_record: dict, rows: list[dict], **extra) -> Path:
    """Write the benchmark's JSON (machine, protocol, rows, extras) where --out says, or under benchmarks/results."""
    import os
    import platform

    from posttrain.runtime import package_versions

    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"{args.out_name}_smoke.json" if args.smoke else f"{args.out_name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": {"smoke": args.smoke, "platform": platform.platform(), "cpus": os.cpu_count(),
                          "threads": args.threads, "load_limit": LOAD_LIMIT, "packages": package_versions(), **machine},
              "protocol": protocol_record, "rows": rows, **extra}
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")
    return out
