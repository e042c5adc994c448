#!/usr/bin/env python3
"""Schema-driven fuzzing of the inference endpoint with schemathesis (pip install schemathesis).

Starts `moeless up` (built-in model) with an API key, points schemathesis at the server's own
`GET /openapi.json`, and runs its example, coverage and fuzzing phases against every operation:
valid and invalid bodies, wrong types, missing fields, odd headers. Checks: no 5xx, every
status and content type is one the document names, every JSON body matches its schema. Then the
server must still be healthy and stop cleanly on SIGTERM. Usage:
scripts/fuzz_endpoint.py [path/to/moeless] [--max-examples N]  (default target/debug/moeless, 25)
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_server import free_port, stop_server, wait_healthy  # noqa: E402

KEY = "fuzz-key"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?", default=os.environ.get("MOELESS_BIN", "target/debug/moeless"))
    ap.add_argument("--max-examples", type=int, default=25)
    args = ap.parse_args()
    st = shutil.which("schemathesis") or shutil.which("st")
    if st is None:
        sys.exit("schemathesis not found on PATH (pip install schemathesis)")
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")
    # A short context keeps fuzzed requests (any max_tokens, n) quick on the built-in model.
    proc = subprocess.Popen(
        [args.binary, "up", "--port", str(port), "--api-key", KEY, "--max-model-len", "64", "--shutdown-timeout", "5"],
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    rc = None
    try:
        wait_healthy(base, proc)
        run = subprocess.run(
            [st, "run", f"{base}/openapi.json",
             "-H", f"Authorization: Bearer {KEY}",
             "--checks", CHECKS,
             "--phases", "examples,coverage,fuzzing",
             "--max-examples", str(args.max_examples),
             "--request-timeout", "60",
             "--workers", "1",
             "--seed", "1",
             "--no-color"],
        )
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            assert r.status == 200, f"unhealthy after fuzzing: {r.status}"
        if run.returncode != 0:
            sys.exit(f"schemathesis found failures (exit {run.returncode})")
    finally:
        rc = stop_server(proc)
        if rc != 0:
            log.seek(0)
            sys.stderr.write(log.read()[-4000:])
    assert rc == 0, f"server exit status after SIGTERM: {rc}"
    print("endpoint fuzzing: ok")


if __name__ == "__main__":
    main()
