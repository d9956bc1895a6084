"""`vllm serve` serves a merged export (docs/export_and_chat.md): a server process that never imports
posttrain, bound to 127.0.0.1, answers chat requests with the greedy completions that transformers gives
on the same directory. Runs where vLLM is installed (`pip install -e ".[vllm]"`, issue 13 brings it into
the test command); the result of a run with it is in docs/export_and_chat.md."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import perturbed_lora_adapter
from posttrain import cli

PROMPTS = ["What is 17 + 25?", "Name a colour.", "Write one word that rhymes with cat.", "What is the capital of France?"]
MAX_TOKENS = 12


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _chat(port: int, prompt: str) -> str:
    body = json.dumps({"model": "exported", "messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
                       "max_tokens": MAX_TOKENS}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def _wait_until_serving(server: subprocess.Popen, port: int, log, limit_s: float = 420.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read()[-4000:]}")
        try:
            if _get(f"http://127.0.0.1:{port}/v1/models")["data"][0]["id"] == "exported":
                return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vllm serve did not answer within {limit_s:.0f} s")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (the vllm extra)")
def test_vllm_serves_a_merged_export_with_the_greedy_completions_of_transformers(smollm2_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = perturbed_lora_adapter(smollm2_dir, tmp_path / "adapter")
    merged = tmp_path / "merged"
    assert cli.main(["export", str(adapter), "--output", str(merged), "--merge", "--model", str(smollm2_dir)]) == 0

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "VLLM_TARGET_DEVICE": "cpu"})
    with open(tmp_path / "server.log", "w+") as log:
        # `vllm serve` itself, minus its console script: vllm-cpu's asks for the version of a `vllm` distribution
        server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
                                   "--model", str(merged), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "exported",
                                   "--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--seed", "0"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            _wait_until_serving(server, port, log)
            served = [_chat(port, prompt) for prompt in PROMPTS]
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    expected = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    print("served:", served, "\ntransformers:", expected)
    assert served == expected
