"""kvpress 0.5.5 goldens for `kvcompact`'s kvpress semantics (spec oracle.md §2; tests/kvpress.rs).

For each context below, formatted exactly as kvpress's pipeline does it (`KVPressTextGenerationPipeline.preprocess`:
the chat template's prefix + the context are compressed, the question follows with the template's suffix), and for
each press × compression ratio, this records

  * the kept rows per (layer, KV head): found by matching the compressed cache's keys, bit for bit, against the keys
    of an uncompressed prefill (KVzip: the complement of `masked_key_indices`, its head-adaptive mask);
  * the greedy answer after compression (kvpress's `generate_answer`: positions continue at the context length,
    stop at the generation config's eos);
  * the press's raw scores [L, n_kv, T] for the score-based presses (one ratio; they do not depend on it).

The model is models/smollm2-135m-instruct in float32 on the CPU. Everything runs offline in the pinned venv
(golden/kvpress/requirements.txt). Usage (from the repository root):

    /work/venvs/kvpress/bin/python golden/kvpress/gen_kvpress.py            # writes golden/kvpress/*.safetensors
    /work/venvs/kvpress/bin/python golden/kvpress/gen_kvpress.py --check    # regenerate in a temp dir, compare bytes
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # golden/_common.py: offline mode and thread pins, before torch is imported
import _common  # noqa: E402
import os  # noqa: E402

os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
from importlib.metadata import version  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save as st_save  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import kvpress  # noqa: E402  (importing it patches the attention functions for KVzip's masks)
from kvpress import (  # noqa: E402
    ExpectedAttentionPress,
    KnormPress,
    KVPressTextGenerationPipeline,
    KVzipPress,
    ObservedAttentionPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from kvpress.presses.scorer_press import ScorerPress  # noqa: E402

REPO = HERE.parent.parent
MODEL_DIR = REPO / "models" / "smollm2-135m-instruct"
RATIOS = [0.5, 0.8]
RANDOM_SEED = 1234
MAX_NEW_TOKENS = 10

# ---------------------------------------------------------------------------------------------------------------
# Contexts (written for this test; 330–420 tokens with the template prefix, so that 20 % of them still holds
# SnapKV's 64-token window and the sentinel never has to break a tie inside it).

FILLER = [
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
]


def passkey_context() -> str:
    parts = []
    for i in range(62):
        parts.append(FILLER[i % len(FILLER)])
        if i == 33:
            parts.append("The pass key is 68219. Remember it. 68219 is the pass key.")
    return " ".join(parts)


NAMES = [
    ("Alice Moreau", "K7-2291"), ("Bruno Lindqvist", "M3-8840"), ("Chiara Conti", "P1-0457"),
    ("Dmitri Volkov", "Q9-3312"), ("Elena Sato", "R2-6675"), ("Farid Haddad", "S5-1908"),
    ("Greta Olsen", "T8-4423"), ("Helena Varga", "V4-7091"), ("Ivan Petrov", "W6-5530"),
    ("Jonas Becker", "X2-9184"), ("Keiko Tanaka", "Y7-2066"), ("Luca Romano", "Z3-3857"),
    ("Maya Cohen", "A5-6612"), ("Nils Eriksen", "B8-0729"), ("Olga Novak", "C1-4485"),
    ("Pablo Ortega", "D6-8301"), ("Quinn Murphy", "E4-1774"), ("Rosa Fischer", "F9-5248"),
    ("Samir Khan", "G2-9936"), ("Tove Berg", "H7-3150"),
]


def names_context() -> str:
    lines = ["Staff access codes for the north building, valid until the end of the year:"]
    lines += [f"{n}: code {c}" for n, c in NAMES]
    lines.append("Codes are personal and must not be shared.")
    return "\n".join(lines)


STORY = (
    "On the rocky island of Carrow there stood an old lighthouse, and in it lived a keeper named Tobias Wren. "
    "Tobias had tended the lamp for thirty-one years. His only company was a grey cat called Pepper, who slept "
    "on the warm brass rail beside the great lens and watched the gulls with half-closed eyes. Every evening at "
    "dusk Tobias climbed the one hundred and twelve steps, trimmed the wick, polished the glass and wrote the "
    "weather in a leather logbook. One winter night a storm rolled in from the west. The waves rose higher than "
    "the harbour wall and the wind tore the shutters from the storeroom. Through the rain Tobias saw the lights "
    "of a small fishing boat, the Marigold, drifting towards the reef. The lamp had gone dark, because the storm "
    "had cracked the chimney and the flame kept dying. Tobias wrapped his coat around the lamp, struck match after "
    "match, and at last the beam swung out across the water again. The Marigold turned just in time and reached "
    "the harbour before midnight. In the morning the fishermen climbed the hill with bread, smoked fish and a new "
    "chimney glass. They found Tobias asleep in his chair, with Pepper curled on his knees, and the logbook open "
    "at a single line: wind west, sea high, lamp kept. The skipper of the Marigold, a tall woman named Ada Quill, "
    "promised to bring him oil and news every month for as long as the lamp burned. From then on, whenever a boat "
    "passed Carrow at night, its crew raised a lantern to the lighthouse, and Tobias answered with the beam."
)

CONTEXTS = [
    {"name": "passkey", "context": passkey_context(), "question": "What is the pass key?"},
    {"name": "names", "context": names_context(), "question": "What is the access code of Helena Varga?"},
    {"name": "story", "context": STORY, "question": "What was the name of the keeper's cat?"},
]

# ---------------------------------------------------------------------------------------------------------------
# Presses. name -> (constructor(ratio), attention implementation, record scores?)

PRESSES = {
    "streaming-llm": (lambda r: StreamingLLMPress(compression_ratio=r), "sdpa", False),
    "snapkv": (lambda r: SnapKVPress(compression_ratio=r), "sdpa", True),
    "pyramidkv": (lambda r: PyramidKVPress(compression_ratio=r), "sdpa", False),
    # A window and β small enough that the pyramid is feasible at these lengths (the defaults fall back to SnapKV).
    "pyramidkv-w16-b2": (lambda r: PyramidKVPress(compression_ratio=r, window_size=16, beta=2), "sdpa", False),
    "tova": (lambda r: TOVAPress(compression_ratio=r), "sdpa", True),
    "knorm": (lambda r: KnormPress(compression_ratio=r), "sdpa", True),
    "expected-attention": (lambda r: ExpectedAttentionPress(compression_ratio=r), "sdpa", True),
    "observed-attention": (lambda r: ObservedAttentionPress(compression_ratio=r), "eager", True),
    "random": (lambda r: RandomPress(compression_ratio=r, seed=RANDOM_SEED), "sdpa", False),
    "kvzip": (lambda r: KVzipPress(compression_ratio=r), "sdpa", True),
}
# QFilterPress is left out: it downloads pretrained filters from the HF hub, and none exist for SmolLM2-135M.


def load_model(attn: str):
    m = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32, attn_implementation=attn)
    m.eval()
    return m


def prefill(model, ids, press=None) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model.model(input_ids=ids, past_key_values=cache)
        else:
            with press(model):
                model.model(input_ids=ids, past_key_values=cache)
    return cache


def greedy(model, cache, question_ids, context_length: int) -> list[int]:
    """kvpress's generate_answer, returning token ids (eos included when reached)."""
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    seq_lengths = [cache.get_seq_length(i) for i in range(len(cache))]
    pos = torch.arange(context_length, context_length + question_ids.shape[1]).unsqueeze(0)
    out = []
    with torch.no_grad():
        if len(set(seq_lengths)) == 1:
            logits = model(input_ids=question_ids, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits
        else:
            # Per-layer lengths differ (PyramidKV): transformers 5.2 builds the question's causal mask from layer 0's
            # length, which does not fit the other layers, so the question goes in one token at a time (same math).
            for i in range(question_ids.shape[1]):
                logits = model(input_ids=question_ids[:, i : i + 1], past_key_values=cache, position_ids=pos[:, i : i + 1]).logits
        out.append(int(logits[0, -1].argmax()))
        p = pos[:, -1:] + 1
        for i in range(MAX_NEW_TOKENS - 1):
            if out[-1] in eos:
                break
            logits = model(input_ids=torch.tensor([[out[-1]]]), past_key_values=cache, position_ids=p + i).logits
            out.append(int(logits[0, -1].argmax()))
    for i, n in enumerate(seq_lengths):  # roll the answer back (kvpress's _remove_answer_from_cache)
        cache.layers[i].keys = cache.layers[i].keys[:, :, :n]
        cache.layers[i].values = cache.layers[i].values[:, :, :n]
    return out


def kept_by_key_match(full: DynamicCache, comp: DynamicCache, n_layers: int, n_kv: int, t: int) -> np.ndarray:
    """[L, n_kv, T] bool: which rows of the uncompressed cache the compressed cache holds (bit-identical keys)."""
    mask = np.zeros((n_layers, n_kv, t), dtype=bool)
    for layer in range(n_layers):
        fk = full.layers[layer].keys[0].numpy()
        ck = comp.layers[layer].keys[0].numpy()
        for h in range(n_kv):
            where = {fk[h, j].tobytes(): j for j in range(t)}
            assert len(where) == t, "duplicate keys in the uncompressed cache"
            for row in ck[h]:
                j = where[row.tobytes()]
                assert not mask[layer, h, j], "a row kept twice"
                mask[layer, h, j] = True
    return mask


def kept_by_kvzip_mask(model, n_layers: int, n_kv: int, t: int) -> np.ndarray:
    mask = np.ones((n_layers, n_kv, t), dtype=bool)
    for layer in model.model.layers:
        b, h, s = layer.self_attn.masked_key_indices
        mask[layer.self_attn.layer_idx, h.numpy(), s.numpy()] = False
        layer.self_attn.masked_key_indices = None
    return mask


def hook_scores(press, store: dict):
    """Record the press's raw score tensor per layer (ScorerPress.score) or KVzip's score_val before its sentinel."""
    if isinstance(press, KVzipPress):
        orig = press.compress_post

        def compress_post(model):
            store["all"] = press.score_val[:, 0].float().clone().numpy()  # [L, n_kv, T]
            return orig(model)

        press.compress_post = compress_post
    else:
        assert isinstance(press, ScorerPress)
        orig = press.score

        def score(module, *args, **kwargs):
            s = orig(module, *args, **kwargs)
            store[int(module.layer_idx)] = s[0].float().clone().numpy()  # [n_kv, T]
            return s

        press.score = score


def run_context(models: dict, tok, pipe, spec: dict) -> tuple[dict, dict]:
    pre = pipe.preprocess(spec["context"], [spec["question"]], "", int(1e10))
    ctx_ids, q_ids = pre["context_ids"], pre["questions_ids"][0]
    t = ctx_ids.shape[1]
    cfg = models["sdpa"].config
    n_layers, n_kv = cfg.num_hidden_layers, cfg.num_key_value_heads
    tensors = {
        "context_ids": ctx_ids[0].numpy().astype(np.int64),
        "question_ids": q_ids[0].numpy().astype(np.int64),
    }
    full = {attn: prefill(m, ctx_ids) for attn, m in models.items()}
    tensors["answer/full"] = np.array(greedy(models["sdpa"], full["sdpa"], q_ids, t), dtype=np.int64)
    info = {"tokens": t, "question_tokens": int(q_ids.shape[1]), "answers": {"full": tok.decode(tensors["answer/full"])}}
    for name, (make, attn, want_scores) in PRESSES.items():
        model = models[attn]
        for ri, ratio in enumerate(RATIOS):
            press = make(ratio)
            store = {}
            if want_scores and ri == 0:
                hook_scores(press, store)
            cache = prefill(model, ctx_ids, press)
            if name == "kvzip":
                answer = greedy(model, cache, q_ids, t)  # the masks act during the answer
                mask = kept_by_kvzip_mask(model, n_layers, n_kv, t)
            else:
                mask = kept_by_key_match(full[attn], cache, n_layers, n_kv, t)
                answer = greedy(model, cache, q_ids, t)
            key = f"{name}/{ratio}"
            tensors[f"kept/{key}"] = np.packbits(mask, axis=-1, bitorder="little")
            tensors[f"answer/{key}"] = np.array(answer, dtype=np.int64)
            info["answers"][key] = tok.decode(answer)
            if store:
                scores = store["all"] if "all" in store else np.stack([store[i] for i in range(n_layers)])
                tensors[f"scores/{name}"] = np.ascontiguousarray(scores, dtype=np.float32)
            print(f"  {spec['name']:8} {key:26} kept {int(mask.sum()):6} / {mask.size}  answer {tok.decode(answer)!r}", flush=True)
    # The KVzip repeat prompt of the single chunk (context < 2048 tokens), as KVzipPress.prepare builds it.
    probe = KVzipPress(compression_ratio=0.5)
    probe._context_ids, probe.context_length = ctx_ids, t
    sep = "\n" + "#" * len("dummy context")
    text = tok.apply_chat_template([{"role": "user", "content": "dummy context" + sep}], add_generation_prompt=True, tokenize=False, enable_thinking=False)
    prefix_text = text.split(sep)[0].split("dummy context")[0]
    probe.prefix_length = len(tok.encode(prefix_text, add_special_tokens=False))
    probe._suffix_ids = tok.encode(text.split(sep)[1], return_tensors="pt", add_special_tokens=False)
    pairs = probe.prepare(models["sdpa"], tok)
    assert len(pairs) == 1
    tensors["kvzip/repeat_ids"] = pairs[0][1][0].numpy().astype(np.int64)
    tensors["kvzip/suffix_ids"] = probe._suffix_ids[0].numpy().astype(np.int64)
    info["kvzip_prefix_length"] = probe.prefix_length
    return tensors, info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=str(HERE))
    ap.add_argument("--check", action="store_true", help="regenerate in a temp dir and compare with the committed files")
    args = ap.parse_args()
    _common.setup_torch()
    hf_logging.disable_progress_bar()
    out_dir = Path(tempfile.mkdtemp(prefix="kvpress-check-")) if args.check else Path(args.out_dir)
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    models = {"sdpa": load_model("sdpa"), "eager": load_model("eager")}
    pipe = KVPressTextGenerationPipeline(model=models["sdpa"], tokenizer=tok)
    files, contexts = {}, {}
    for spec in CONTEXTS:
        tensors, info = run_context(models, tok, pipe, spec)
        meta = {"kvpress_golden": json.dumps({"context": spec["name"], "ratios": RATIOS, **info}, sort_keys=True)}
        path = out_dir / f"{spec['name']}.safetensors"
        _common.atomic_write_bytes(path, st_save(dict(sorted(tensors.items())), metadata=meta))
        files[path.name] = _common.sha256_file(path)
        contexts[spec["name"]] = {"context": spec["context"], "question": spec["question"], **info}
    if args.check:
        bad = [f for f, h in files.items() if _common.sha256_file(HERE / f) != h]
        print("identical" if not bad else f"DIFFERENT: {bad}")
        sys.exit(1 if bad else 0)
    manifest = {
        "description": "kvpress 0.5.5 goldens (kept rows per (layer, KV head), greedy answers, raw scores); see README.md",
        "command": "/work/venvs/kvpress/bin/python golden/kvpress/gen_kvpress.py",
        "generator_sha256": _common.sha256_file(Path(__file__)),
        "model": {"dir": "models/smollm2-135m-instruct", "dtype": "float32",
                  "model.safetensors_sha256": _common.sha256_file(MODEL_DIR / "model.safetensors")},
        "versions": {"python": platform.python_version(), **{p: version(p) for p in
                     ["torch", "transformers", "kvpress", "safetensors", "numpy", "tokenizers"]}},
        "torch_threads": _common.TORCH_THREADS,
        "ratios": RATIOS,
        "random_seed": RANDOM_SEED,
        "max_new_tokens": MAX_NEW_TOKENS,
        "presses": {n: repr(make(RATIOS[0])) + f" [attn_implementation={attn}]" for n, (make, attn, _) in PRESSES.items()},
        "layout": {
            "context_ids, question_ids": "I64 token ids as KVPressTextGenerationPipeline.preprocess makes them",
            "kept/<press>/<ratio>": "U8 [L, n_kv, ceil(T/8)]: np.packbits(mask, bitorder='little') of the kept rows",
            "answer/<press>/<ratio>, answer/full": "I64 greedy answer ids after compression (eos kept when reached)",
            "scores/<press>": f"F32 [L, n_kv, T] raw press scores at ratio {RATIOS[0]} (KVzip: score_val before the sink sentinel)",
            "kvzip/repeat_ids, kvzip/suffix_ids": "I64 KVzip's repeat input (prompt + suffix + context) and the template suffix",
        },
        "contexts": contexts,
        "files": files,
    }
    _common.atomic_write_json(HERE / "manifest.json", manifest)


if __name__ == "__main__":
    main()
