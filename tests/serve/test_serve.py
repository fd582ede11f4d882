"""`kvcompact serve` through the official `openai` client and raw HTTP: the API, batch
invariance against `kvcompact generate`, the bad-input catalog, documents across a restart,
compaction under KV pressure, cancellation on disconnect, and the SIGTERM drain."""

import concurrent.futures as cf
import json
import threading

import httpx
import openai
import pytest

from conftest import generate, wait_until

EOS_TEXT = ("<|im_end|>", "<|endoftext|>")


def strip_eos(text):
    for e in EOS_TEXT:
        if text.endswith(e):
            return text[: -len(e)]
    return text


def client(server, key="none"):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def chat_text(c, prompt, **kw):
    r = c.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": prompt}], temperature=0, **kw)
    return r


def test_models_and_health(server):
    c = client(server)
    ids = [m.id for m in c.models.list().data]
    assert ids == ["smollm2-135m-instruct"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_chat_equals_generate(server):
    prompt = "What is the capital of France?"
    r = chat_text(client(server), prompt, max_tokens=24)
    ref = generate(prompt, chat=True, max_tokens=24)
    assert r.choices[0].message.content == strip_eos(ref["text"])
    assert r.choices[0].finish_reason == ("stop" if ref["stop"] == "eos" else "length")
    assert r.usage.prompt_tokens == ref["prompt_tokens"]
    assert r.usage.completion_tokens == len(ref["tokens"])


def test_stream_equals_non_stream(server):
    c = client(server)
    prompt = "List three colours of the rainbow."
    whole = chat_text(c, prompt, max_tokens=32).choices[0].message.content
    stream = c.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                parts.append(ch.delta.content)
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    assert "".join(parts) == whole
    assert len(reasons) == 1 and reasons[0] in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0


def test_completions_equal_generate(server):
    prompt = "The capital of France is"
    r = client(server).completions.create(model="smollm2-135m-instruct", prompt=prompt, temperature=0, max_tokens=16)
    ref = generate(prompt, chat=False, max_tokens=16)
    assert r.choices[0].text == strip_eos(ref["text"])
    assert r.usage.completion_tokens == len(ref["tokens"])


def test_stop_strings(server):
    c = client(server)
    prompt = "Write two sentences about the sea."
    full = chat_text(c, prompt, max_tokens=40).choices[0].message.content
    assert len(full) > 20, full
    stop = full[12:15]  # a stop string taken from the answer itself: the answer must end before it
    cut = chat_text(c, prompt, max_tokens=40, stop=[stop, "never-appears"]).choices[0]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = c.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=40, stop=stop, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == full[: full.index(stop)]


def test_eight_concurrent_streams_equal_sequential(server):
    c = client(server)
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]

    def run(p, seed):
        s = c.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": p}], temperature=0.8, seed=seed, max_tokens=24, stream=True
        )
        return "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)

    sequential = [run(p, i) for i, p in enumerate(prompts)]
    before = server.metrics()
    with cf.ThreadPoolExecutor(8) as ex:
        concurrent = list(ex.map(lambda a: run(*a), [(p, i) for i, p in enumerate(prompts)]))
    after = server.metrics()
    assert concurrent == sequential
    steps = after["kvcompact_decode_batch_size_count"] - before["kvcompact_decode_batch_size_count"]
    seqs = after["kvcompact_decode_batch_size_sum"] - before["kvcompact_decode_batch_size_sum"]
    assert seqs / steps > 2.0, f"the concurrent streams were not batched ({seqs} sequence-steps in {steps} steps)"


def post(server, path, body, headers=None):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=data, headers={"content-type": "application/json", **(headers or {})}, timeout=60)


def stream_text(s, body):
    """Stream a completion; returns (text, finish reasons, error objects)."""
    text, reasons, errors = [], [], []
    with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                errors.append(obj["error"])
                continue
            for ch in obj["choices"]:
                text.append(ch["text"])
                if ch["finish_reason"]:
                    reasons.append(ch["finish_reason"])
    return "".join(text), reasons, errors


@pytest.mark.parametrize(
    "body,status,param",
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        ({"messages": "hello"}, 400, "messages"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
        ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "messages"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"messages": [{"role": "user", "content": "hi"}], "kvcompact": {"document": "doc-0000"}}, 404, "document"),
        ({"messages": [{"role": "user", "content": "hi"}], "kvcompact": {"compaction": {"method": "snapkv"}}}, 400, "kvcompact.compaction.method"),
    ],
)
def test_bad_input_catalog(server, body, status, param):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param, err


def test_other_http_errors(server):
    assert httpx.get(f"{server.url}/v1/nowhere").status_code == 404
    assert httpx.get(f"{server.url}/v1/nowhere").json()["error"]["message"]
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * (9 << 20) + b'"}]}'
    r = post(server, "/v1/chat/completions", big)
    assert r.status_code == 413 and r.json()["error"]["message"]
    assert post(server, "/v1/completions", {"prompt": ""}).status_code == 400
    assert post(server, "/v1/documents", {"text": "  "}).status_code == 400
    assert httpx.get(f"{server.url}/v1/documents/doc-nope").status_code == 404
    assert httpx.delete(f"{server.url}/v1/documents/doc-nope").status_code == 404


def test_api_key(start_server):
    s = start_server("--api-key", "sekret")
    with pytest.raises(openai.AuthenticationError):
        client(s, key="wrong").models.list()
    r = httpx.get(f"{s.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert [m.id for m in client(s, key="sekret").models.list().data] == ["smollm2-135m-instruct"]
    assert httpx.get(f"{s.url}/health").status_code == 200


DOC = (
    "The Harbour Lantern Company was founded in 1921 by Ada Morrow in the port town of Kelby. "
    "Its first product was a storm lantern with a brass hood. The company's code name for the "
    "lantern was BLUE-HERON-47. In 1950 the workshop moved to Pier Street, and by 1960 it employed "
    "forty people. The lanterns were sold to fishing fleets along the whole coast."
) * 3


def test_documents_survive_a_restart(start_server, tmp_path):
    store = tmp_path / "docstore"
    s = start_server(store=store)
    r = post(s, "/v1/documents", {"text": DOC, "ratio": 4})
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["id"].startswith("doc-") and info["tokens"] > 100
    assert 0 < info["kv_bytes"] < info["kv_bytes_full"]
    assert info["fidelity"]["rel_l2"] >= 0
    c = client(s)
    ask = dict(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "What was the lantern's code name?"}], temperature=0, max_tokens=24)
    first = c.chat.completions.create(**ask, extra_body={"kvcompact": {"document": info["id"]}}).choices[0].message.content
    assert first
    assert [d["id"] for d in httpx.get(f"{s.url}/v1/documents").json()["data"]] == [info["id"]]
    assert s.stop() == 0
    s2 = start_server(store=store)
    assert httpx.get(f"{s2.url}/v1/documents/{info['id']}").json()["tokens"] == info["tokens"]
    again = client(s2).chat.completions.create(**ask, extra_body={"kvcompact": {"document": info["id"]}}).choices[0].message.content
    assert again == first
    assert httpx.delete(f"{s2.url}/v1/documents/{info['id']}").json()["deleted"] is True
    assert httpx.get(f"{s2.url}/v1/documents/{info['id']}").status_code == 404


def three_long_stories(c):
    """Three concurrent greedy chats of up to 220 tokens each; their finish reasons."""

    def run(i):
        r = c.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": f"Tell me a long story about a lighthouse keeper named Keeper{i}."}],
            temperature=0,
            max_tokens=220,
        )
        return r.choices[0].finish_reason

    with cf.ThreadPoolExecutor(3) as ex:
        return list(ex.map(run, range(3)))


def test_budget_pressure_compacts_instead_of_refusing(start_server):
    # SmolLM2 holds 45 KiB of KV per token: three sequences of ~270 rows need ~35 MiB, more than
    # twice the budget, so the engine must compact while they run.
    s = start_server("--kv-budget-mib", "16", "--keep-recent", "16", "--ratio", "4")
    assert all(r in ("stop", "length") for r in three_long_stories(client(s)))
    m = s.metrics()
    assert m["kvcompact_compactions_total"] >= 1, m
    assert m["kvcompact_compaction_freed_bytes_total"] > 0
    assert m["kvcompact_refused_total"] == 0


def test_bf16_kv_serves_like_generate_in_half_the_bytes(start_server):
    # SmolLM2: 30 layers x 3 KV heads; a row is a bf16 key and value of 64 plus a u32 position.
    row_bytes = 30 * 3 * (2 * 64 * 2 + 4)
    s = start_server("--kv-dtype", "bf16", "--kv-budget-mib", "8", "--keep-recent", "16", "--ratio", "4")
    c = client(s)
    # Four greedy chats at once (well inside the budget): each equals `generate --kv-dtype bf16`.
    prompts = [f"Name a fruit that starts with the letter {ch}." for ch in "ABCD"]
    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda p: chat_text(c, p, max_tokens=20).choices[0].message.content, prompts))
    for p, g in zip(prompts, got):
        assert g == strip_eos(generate(p, chat=True, max_tokens=20, extra=("--kv-dtype", "bf16"))["text"])
    # A document's full-context bytes are counted at bf16 rows.
    r = post(s, "/v1/documents", {"text": "The ferry leaves Pier 4 at 07:15 and returns at 18:40.", "ratio": 2})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["kv_bytes_full"] == d["tokens"] * row_bytes and 0 < d["kv_bytes"] < d["kv_bytes_full"]
    # Three long stories need ~19 MB of bf16 KV, more than twice the 8 MiB budget: compaction.
    assert all(r in ("stop", "length") for r in three_long_stories(c))
    m = s.metrics()
    assert m["kvcompact_compactions_total"] >= 2, m
    assert m["kvcompact_refused_total"] == 0


def test_compaction_runs_beside_decoding(start_server, tmp_path):
    # Compaction under --kv-budget-mib runs on a worker thread: while the long sequence's cache is
    # being compacted, the engine answers a short request. KVCOMPACT_HOLD_COMPACTION holds the
    # compacted cache back until the test creates the file, so the ordering is certain whatever
    # the machine's speed. Budget: 10 MiB at ~45 KiB per token; background compaction starts at
    # 7/8 of it (~197 tokens), which the long request (~110 prompt + 160 generated) passes.
    gate = tmp_path / "release-compaction"
    s = start_server("--kv-budget-mib", "10", "--keep-recent", "16", "--ratio", "4", env={"KVCOMPACT_HOLD_COMPACTION": str(gate)})
    short = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    ref_short = post(s, "/v1/completions", short).json()["choices"][0]["text"]
    long = {"prompt": "The lighthouse keeper wrote in his log. " * 12, "max_tokens": 160, "temperature": 0, "ignore_eos": True}
    out = {}
    t = threading.Thread(target=lambda: out.update(long=stream_text(s, long)))
    t.start()
    try:
        assert wait_until(lambda: s.metrics()["kvcompact_compactions_in_flight"] == 1, timeout=120), "no compaction started"
        r = post(s, "/v1/completions", short)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref_short
        m = s.metrics()
        assert m["kvcompact_compactions_in_flight"] == 1 and m["kvcompact_compactions_total"] == 0, "answered before the compaction came back"
        assert "long" not in out
    finally:
        gate.touch()
        t.join(300)
    text, reasons, errors = out["long"]
    assert reasons == ["length"] and not errors
    m = s.metrics()
    assert m["kvcompact_compactions_total"] == 1 and m["kvcompact_compactions_in_flight"] == 0
    assert m["kvcompact_compaction_freed_bytes_total"] > 0 and m["kvcompact_refused_total"] == 0
    # Alone, compacted at the same point, the long request gives the same text.
    assert stream_text(s, long) == out["long"]
    assert s.metrics()["kvcompact_compactions_total"] == 2


def test_request_larger_than_budget_is_429(start_server):
    s = start_server("--kv-budget-mib", "0.2")
    r = post(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 4})
    assert r.status_code == 429, r.text
    assert r.headers.get("retry-after")
    assert r.json()["error"]["code"] == "kv_memory_exhausted"


def test_disconnect_frees_memory(server):
    body = {"messages": [{"role": "user", "content": "Write a very long essay about rivers."}], "max_tokens": 2000, "stream": True, "temperature": 0, "ignore_eos": True}
    seen, base = None, server.metrics()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 5:
                # Still connected: the sequence holds KV memory. (Leaving the loop closes the
                # response, which is the disconnect.)
                seen = server.metrics()
                break
    assert seen["kvcompact_running_sequences"] == 1 and seen["kvcompact_kv_bytes"] > 0, seen
    assert wait_until(lambda: server.metrics()["kvcompact_running_sequences"] == 0), "the sequence was not dropped"
    m = server.metrics()
    assert m["kvcompact_kv_bytes"] == 0
    assert m["kvcompact_cancelled_total"] > base["kvcompact_cancelled_total"]
    assert m["kvcompact_generated_tokens_total"] - base["kvcompact_generated_tokens_total"] < 200, "the engine kept generating for a client that left"


def test_sigterm_drains_in_flight(start_server):
    s = start_server()
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 40, "stream": True, "temperature": 0}
    lines = []

    def read():
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)

    t = threading.Thread(target=read)
    t.start()
    assert wait_until(lambda: len(lines) >= 2)
    assert s.stop() == 0
    t.join(30)
    assert lines[-1] == "data: [DONE]" or lines[-2] == "data: [DONE]", lines[-3:]
    assert any('"finish_reason":"' in ln for ln in lines)


def test_engine_panic_is_500_and_the_server_lives_on(start_server):
    # The fail point (KVCOMPACT_FAIL_POINT) makes the prefill of a marked prompt panic. Only that
    # request fails: a stream already running beside it finishes normally.
    s = start_server(env={"KVCOMPACT_FAIL_POINT": "<<fail-here>>"})
    body = {"prompt": "Once upon a time", "max_tokens": 48, "stream": True, "temperature": 0, "ignore_eos": True}
    lines = []

    def read():
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as r:
            lines.append(r.status_code)
            lines.extend(r.iter_lines())

    t = threading.Thread(target=read)
    t.start()
    assert wait_until(lambda: len(lines) >= 3), "the healthy stream did not start"
    r = post(s, "/v1/completions", {"prompt": "Say hi <<fail-here>>", "max_tokens": 4})
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["type"] == "server_error" and "\n" not in err["message"], err
    t.join(60)
    assert lines[0] == 200 and "data: [DONE]" in lines, lines[-3:]
    assert not any('"error"' in str(ln) for ln in lines), [ln for ln in lines if '"error"' in str(ln)]
    ok = post(s, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["text"]
    assert s.metrics()["kvcompact_engine_panics_total"] == 1


def test_decode_panic_fails_only_its_sequence(start_server):
    # With `decode:MARKER` the marked request panics in the batched decode step after its first
    # token. The engine rolls the batch back, decodes each sequence alone to find the culprit and
    # fails only that one; the stream decoding beside it gets exactly the tokens it gets alone.
    s = start_server(env={"KVCOMPACT_FAIL_POINT": "decode:<<fail-in-decode>>"})
    body = {"prompt": "Once upon a time", "max_tokens": 96, "temperature": 0.7, "seed": 3, "ignore_eos": True}
    alone = stream_text(s, body)
    assert alone[1] == ["length"] and not alone[2]
    before = s.metrics()
    out = {}
    t = threading.Thread(target=lambda: out.update(healthy=stream_text(s, body)))
    t.start()
    # Send the faulty request once the healthy one decodes: its first decode step then shares
    # a batch with the healthy sequence, which still has most of its 96 tokens to go.
    assert wait_until(lambda: s.metrics()["kvcompact_generated_tokens_total"] >= before["kvcompact_generated_tokens_total"] + 2)
    r = post(s, "/v1/completions", {"prompt": "Say hi <<fail-in-decode>>", "max_tokens": 8, "ignore_eos": True})
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["type"] == "server_error" and "\n" not in err["message"], err
    t.join(300)
    assert out["healthy"] == alone
    m = s.metrics()
    assert m["kvcompact_engine_panics_total"] == 1
    # The two shared at least one batched step (the one that panicked).
    assert m['kvcompact_decode_batch_size_bucket{le="1"}'] - before['kvcompact_decode_batch_size_bucket{le="1"}'] < m["kvcompact_decode_batch_size_count"] - before["kvcompact_decode_batch_size_count"]
    ok = post(s, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["text"]


def test_documents_in_ram_count_against_the_kv_budget(start_server):
    budget_mib = 8
    s = start_server("--kv-budget-mib", str(budget_mib), "--documents-mib", "64")
    info = post(s, "/v1/documents", {"text": DOC, "ratio": 4}).json()
    assert s.metrics()["kvcompact_documents_hot_bytes"] == info["kv_bytes"]
    # A prompt that fits the budget alone but not beside the document in RAM: the document is
    # dropped from RAM (its file stays) instead of the request being refused.
    row = 46 * 1024  # SmolLM2-135M: ~45.3 KiB of KV per token
    rows = ((budget_mib << 20) - info["kv_bytes"] + (3 << 19)) // row
    assert rows * row < budget_mib << 20
    r = chat_text(client(s), "word " * (rows - 30), max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    m = s.metrics()
    assert m["kvcompact_documents_hot_bytes"] == 0, m
    assert m["kvcompact_documents_shed_bytes_total"] == info["kv_bytes"]
    assert m["kvcompact_refused_total"] == 0
    # The document is read back from its file when a chat asks for it.
    ask = dict(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "What was the lantern's code name?"}], temperature=0, max_tokens=8)
    assert client(s).chat.completions.create(**ask, extra_body={"kvcompact": {"document": info["id"]}}).choices[0].message.content
