"""`posttrain chat RUN_OR_ADAPTER [--prompt TEXT]`: talk to a trained model in the terminal.

The model (the run's adapter on its base model, merged in memory, or a full model) answers each prompt
typed in, streaming its tokens as they are generated, through the tokenizer's chat template; the
conversation is kept, so later turns see the earlier ones. `--prompt` answers one prompt and exits;
`/exit` or end of input (Ctrl-D) ends an interactive session. `--temperature 0` is greedy decoding.
"""

from __future__ import annotations

import sys
import threading
from typing import Optional, TextIO

from posttrain.errors import PosttrainError
from posttrain.export import load_merged
from posttrain.models import load_tokenizer


def load_chat_model(source: str, model: Optional[str] = None):
    """(model, tokenizer) of a run, adapter or model directory, ready to generate."""
    lm, directory, _ = load_merged(source, model)
    tokenizer = load_tokenizer(str(directory))
    if not tokenizer.chat_template:
        raise PosttrainError(f"{directory}: the tokenizer has no chat template to render the conversation with.")
    lm.eval()
    lm.config.use_cache = True
    return lm, tokenizer


def answer(lm, tokenizer, messages: list[dict], temperature: float, max_new_tokens: int, out: TextIO) -> str:
    """Generate the assistant's reply to `messages`, writing its text to `out` as it streams; returns the reply."""
    import torch
    from transformers import TextIteratorStreamer

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"].to(lm.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                  streamer=streamer, pad_token_id=tokenizer.pad_token_id, **sampling)
    thread = threading.Thread(target=lambda: lm.generate(**kwargs), daemon=True)
    with torch.no_grad():
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            out.write(piece)
            out.flush()
        thread.join()
    out.write("\n")
    out.flush()
    return "".join(pieces)


def chat(source: str, prompt: Optional[str], temperature: float, max_new_tokens: int, model: Optional[str] = None,
         system: Optional[str] = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    lm, tokenizer = load_chat_model(source, model)
    messages = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        answer(lm, tokenizer, messages + [{"role": "user", "content": prompt}], temperature, max_new_tokens, stdout)
        return 0
    stdout.write("posttrain chat: type a message; /exit or Ctrl-D ends\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        stdout.write("assistant> ")
        reply = answer(lm, tokenizer, messages, temperature, max_new_tokens, stdout)
        messages.append({"role": "assistant", "content": reply})
