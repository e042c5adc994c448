#!/usr/bin/env python3
"""Decode-step latency of Hugging Face transformers' Mixtral on a checkpoint that
`moeless bench engine` generated (same weights), batch 1, bf16, on the GPU: the peer of
`moeless bench engine --device cuda`. Writes JSON with --out."""
import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    a = p.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.checkpoint, torch_dtype=torch.bfloat16).cuda().eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, vocab, (1, a.prompt_len), generator=g).cuda()
    rates = []
    with torch.no_grad():
        for _ in range(a.repeats + 1):
            out = model(prompt, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            rates.append(a.steps / (time.perf_counter() - t0))
    rates = sorted(rates[1:])
    tps = rates[len(rates) // 2]
    doc = {"transformers_decode_tokens_per_s": tps, "ms_per_step": 1e3 / tps,
           "torch": torch.__version__, "device": torch.cuda.get_device_name(0), "checkpoint": a.checkpoint}
    print(json.dumps(doc))
    if a.out:
        json.dump(doc, open(a.out, "w"), indent=2)


if __name__ == "__main__":
    sys.exit(main())
