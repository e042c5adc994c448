#!/usr/bin/env python3
"""Drives `moeless up` with the official `openai` Python client (pip install openai).

Starts the binary on a free port with an API key, checks completions and chat (streaming and
not, usage, stop, n, logprobs) and the error mapping (401, 404, 400), then sends SIGTERM and expects a
clean exit. Usage: scripts/openai_client_check.py [path/to/moeless]  (default target/debug/moeless,
or $MOELESS_BIN).
"""
import os
import subprocess
import sys

import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_server import free_port, stop_server, wait_healthy  # noqa: E402

KEY = "check-key"
MODEL = "moeless-builtin"


def expect_error(cls, fn):
    try:
        fn()
    except cls as e:
        assert isinstance(e.body, dict) and "message" in e.body, e.body
        return
    raise AssertionError(f"expected {cls.__name__}")


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MOELESS_BIN", "target/debug/moeless")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "up", "--port", str(port), "--api-key", KEY, "--max-model-len", "256", "--shutdown-timeout", "5"],
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)

        assert [m.id for m in client.models.list().data] == [MODEL]

        r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 5, r.usage
        assert r.choices[0].finish_reason == "length"
        greedy = r.choices[0].text

        chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy
        assert chunks[-1].usage.completion_tokens == 8

        if len(greedy) >= 4:
            stop = greedy[2:4]
            s = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0, stop=[stop])
            assert s.choices[0].finish_reason == "stop" and stop not in s.choices[0].text

        c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_completion_tokens=6, n=2, seed=1)
        assert len(c.choices) == 2 and c.usage.completion_tokens == 12
        assert c.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 6

        # Log-probabilities parse into the client's typed objects, in both formats.
        lp = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
        lps = lp.choices[0].logprobs
        assert len(lps.tokens) == 4 and len(lps.token_logprobs) == 4 and len(lps.text_offset) == 4, lps
        assert all(v <= 0 for v in lps.token_logprobs) and all(1 <= len(t) <= 3 for t in lps.top_logprobs), lps
        scored = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1, temperature=0, echo=True,
                                           logprobs=1).choices[0].logprobs
        assert len(scored.tokens) == 6 and scored.token_logprobs[0] is None, scored
        assert all(v <= 0 for v in scored.token_logprobs[1:]), scored
        c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                           extra_body={"ignore_eos": True})
        content = c.choices[0].logprobs.content
        assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content), content
        assert content[0].logprob <= 0 and isinstance(content[0].bytes, list), content[0]

        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        expect_error(openai.AuthenticationError, lambda: bad.models.list())
        expect_error(openai.NotFoundError,
                     lambda: client.completions.create(model="nope", prompt="x", max_tokens=1))
        expect_error(openai.BadRequestError,
                     lambda: client.completions.create(model=MODEL, prompt="x" * 300, max_tokens=1))
    finally:
        rc = stop_server(proc)
    assert rc == 0, f"server exit status after SIGTERM: {rc}\n{proc.stderr.read()}"
    print("openai client check: ok")


if __name__ == "__main__":
    main()
