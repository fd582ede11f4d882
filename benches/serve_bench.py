#!/usr/bin/env python3
"""Load generator for OpenAI-compatible servers (serving.md, "Measuring it"): N concurrent clients
each stream one chat completion of a fixed prompt with a fixed number of generated tokens
(`ignore_eos`), greedy. Reports aggregate generated tok/s, p50/p99 time to first token, p50/p99
inter-token latency, and the server's peak RSS (VmHWM of the given pid).

    serve_bench.py URL --clients 1,2,4,8,16 [--tokens 128] [--pid PID] [--label NAME] [--out F.jsonl]

Needs only `httpx` (installed with the openai client in .venv). A benchmark, not a test: run it
on a quiet machine, one benchmark at a time.
"""

import argparse
import json
import platform
import statistics
import threading
import time

import httpx

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."


def pct(v, q):
    if not v:
        return float("nan")
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def one(url, model, tokens, out, i):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"{PROMPT} (story {i})"}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    stamps = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            for ch in d.get("choices", []):
                if (ch.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
    out[i] = (t0, stamps)


def peak_rss_mib(pid):
    try:
        for ln in open(f"/proc/{pid}/status"):
            if ln.startswith("VmHWM:"):
                return int(ln.split()[1]) / 1024
    except OSError:
        pass
    return None


def run(url, model, clients, tokens):
    out = [None] * clients
    threads = [threading.Thread(target=one, args=(url, model, tokens, out, i)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [s[0] - t for t, s in out if s]
    itl = [b - a for _, s in out for a, b in zip(s, s[1:])]
    n = sum(len(s) for _, s in out)
    return {
        "clients": clients,
        "generated_chunks": n,
        "wall_s": wall,
        # Every stream generates exactly `tokens` (ignore_eos): chunks can merge tokens whose text
        # is incomplete UTF-8, so the rate counts tokens, not chunks.
        "agg_tok_s": clients * tokens / wall,
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p99_s": pct(ttft, 0.99),
        "itl_p50_ms": 1000 * pct(itl, 0.5),
        "itl_p99_ms": 1000 * pct(itl, 0.99),
        "itl_mean_ms": 1000 * statistics.fmean(itl) if itl else float("nan"),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--label", default="server")
    ap.add_argument("--out")
    a = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    run(a.url, a.model, 1, 8)  # warm-up
    for c in [int(x) for x in a.clients.split(",")]:
        r = {"label": a.label, "cpu": cpu, **run(a.url, a.model, c, a.tokens)}
        if a.pid:
            r["peak_rss_mib"] = peak_rss_mib(a.pid)
        print(json.dumps(r), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
