#!/usr/bin/env python3
"""The memory experiment of serving.md: how many concurrent ~2k-token conversations a server holds
in one KV memory budget. N clients each stream one chat whose prompt is a distinct ~2k-token
document plus a question, `max_tokens` generated; a trial passes when every client gets HTTP 200
and its full stream. Prints one JSON row per trial (N, passed, refusals/errors, wall seconds,
prompt tokens, and the server's /metrics compaction counters when it has them).

    serve_memory.py URL --clients 4,8,12 [--tokens 32] [--prompt-tokens 2000] [--label NAME] [--out F.jsonl]

Needs only `httpx`. A benchmark, not a test; one at a time on a quiet machine.
"""

import argparse
import json
import random
import threading
import time

import httpx

WORDS = ("amber basalt cedar delta ember fjord garnet harbor indigo juniper kestrel lantern meadow "
         "nickel orchard pebble quarry raven saffron tundra umber velvet willow xenon yarrow zephyr").split()


def document(i, approx_tokens):
    """A distinct document of roughly `approx_tokens` tokens (≈ 16 SmolLM2 tokens per record)."""
    rng = random.Random(1000 + i)
    recs = []
    for k in range(max(1, approx_tokens // 16)):
        recs.append(f"Record {i}-{k}: {rng.choice(WORDS)} {rng.choice(WORDS)} {rng.randint(10, 999)}.")
    return " ".join(recs)


def one(url, model, tokens, prompt_tokens, out, i):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": document(i, prompt_tokens) + "\nWhich word appears most often above?"}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    got, status, usage = 0, None, None
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=1800) as r:
            status = r.status_code
            if status != 200:
                r.read()
                out[i] = (status, 0, None, r.text[:200])
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if d.get("usage"):
                    usage = d["usage"]
                for ch in d.get("choices", []):
                    if (ch.get("delta") or {}).get("content"):
                        got += 1
    except httpx.HTTPError as e:
        out[i] = (status, got, usage, str(e)[:200])
        return
    out[i] = (status, got, usage, None)


def metrics(url):
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    m = {}
    for ln in text.splitlines():
        if ln.startswith("kvcompact_") and " " in ln and "{" not in ln:
            k, v = ln.rsplit(" ", 1)
            m[k] = float(v)
    return m


def trial(url, model, n, tokens, prompt_tokens):
    before = metrics(url)
    out = [None] * n
    threads = [threading.Thread(target=one, args=(url, model, tokens, prompt_tokens, out, i)) for i in range(n)]
    # Residency, not just service: the most sequences (and KV bytes) held at once, polled from
    # /metrics (kvcompact only; llama-server holds one slot per client by construction).
    peak = {"running": 0, "kv_bytes": 0}
    done = threading.Event()

    def poll():
        while not done.wait(0.5):
            m = metrics(url)
            peak["running"] = max(peak["running"], int(m.get("kvcompact_running_sequences", 0)))
            peak["kv_bytes"] = max(peak["kv_bytes"], int(m.get("kvcompact_kv_bytes", 0)))

    poller = threading.Thread(target=poll)
    poller.start()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    after = metrics(url)
    ok = [o for o in out if o and o[0] == 200 and o[3] is None]
    prompt = [o[2]["prompt_tokens"] for o in ok if o[2]]
    delta = lambda k: after.get(k, 0) - before.get(k, 0)
    return {
        "clients": n,
        "passed": len(ok) == n,
        "ok": len(ok),
        "statuses": sorted({o[0] for o in out if o}, key=str),
        "first_error": next((o[3] for o in out if o and o[3]), None),
        "wall_s": round(wall, 1),
        "prompt_tokens_mean": round(sum(prompt) / len(prompt)) if prompt else None,
        "compactions": delta("kvcompact_compactions_total") if after else None,
        "freed_mib": round(delta("kvcompact_compaction_freed_bytes_total") / 2**20, 1) if after else None,
        "refused": delta("kvcompact_refused_total") if after else None,
        "peak_running": peak["running"] if after else None,
        "peak_kv_mib": round(peak["kv_bytes"] / 2**20, 1) if after else None,
        "compaction_s_mean": round(delta("kvcompact_compaction_seconds_sum") / max(1, delta("kvcompact_compaction_seconds_count")), 1) if after else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--clients", default="2,4,8")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--label", default="server")
    ap.add_argument("--out")
    ap.add_argument("--stop-at-failure", action="store_true")
    a = ap.parse_args()
    for n in [int(x) for x in a.clients.split(",")]:
        r = {"label": a.label, **trial(a.url, a.model, n, a.tokens, a.prompt_tokens)}
        print(json.dumps(r), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")
        if a.stop_at_failure and not r["passed"]:
            break


if __name__ == "__main__":
    main()
