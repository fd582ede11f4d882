#!/usr/bin/env python3
"""Generate the tiny random-weight HF models in golden/tiny/<name>/ and their golden outputs.

Each model directory (committed, each < 2 MB) holds:
  config.json, model.safetensors, generation_config.json   (HF save_pretrained, f32, safe_serialization)
  tokenizer.json, tokenizer_config.json                    (tiny byte-level BPE trained here, ChatML template)
  golden.safetensors                                       (reference outputs, see GOLDEN_DOC below)

The goldens are computed from the model *reloaded from disk* with AutoModelForCausalLM (eager attention, f32),
so config.json parsing by transformers is part of what is checked.

Usage:  python golden/gen_tiny.py [--only NAME ...] [--check]
  --check  regenerate into memory and compare byte-for-byte with the files on disk; write nothing.
"""

import _common  # noqa: F401  (sets thread/offline env vars before torch is imported)

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    GOLDEN_DIR,
    atomic_write_bytes,
    generator_info,
    json_dumps,
    lib_versions,
    setup_torch,
    sha256_file,
    update_manifest,
)

torch = setup_torch()
import transformers  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TINY_DIR = GOLDEN_DIR / "tiny"
CORPUS = TINY_DIR / "tokenizer_corpus.txt"

VOCAB = 384
T_PROMPT = 40
N_GREEDY = 24
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOKENIZER_SEED_NOTE = "BPE trained deterministically on tiny/tokenizer_corpus.txt (no randomness)"

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=256,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# name -> (config class name, config kwargs, seed, legacy_rope_config)
# legacy_rope_config: if not None, config.json is rewritten in the transformers-4.x style
# (top-level "rope_theta" + "rope_scaling") instead of the 5.x "rope_parameters" block, so that the
# Rust config parser is exercised on both spellings. The reload check below proves transformers reads both
# identically (goldens are computed from the reloaded model).
MODELS = {
    "llama-mha": (
        "LlamaConfig",
        dict(COMMON, num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        1001,
        None,
    ),
    "llama-gqa": (
        "LlamaConfig",
        # llama3 rope: with head_dim 16, theta 1e4 the wavelengths are 2*pi*1e4^(i/8) = 6.3, 19.9, 62.8, 199, ...
        # original_max_position_embeddings=64, low/high_freq_factor=1/4 -> low_freq_wavelen 64, high_freq_wavelen 16:
        # i=0 unchanged, i=1,2 smoothed, i>=3 divided by factor 8. All three branches are exercised.
        dict(COMMON, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=False,
             rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        1002,
        None,
    ),
    "qwen2-bias": (
        "Qwen2Config",
        dict(COMMON, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
             use_sliding_window=False, sliding_window=None, max_window_layers=4,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        1003,
        {"rope_theta": 10000.0, "rope_scaling": None},
    ),
    "qwen3-qknorm": (
        "Qwen3Config",
        # head_dim 24 != hidden/heads = 16: q_proj is [96, 64], o_proj is [64, 96]. rope_theta 1e6 as in real Qwen3.
        dict(COMMON, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6, tie_word_embeddings=True,
             attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=4,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        1004,
        None,
    ),
    "mistral": (
        "MistralConfig",
        dict(COMMON, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=False,
             sliding_window=None,
             rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        1005,
        {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    ),
}

# Re-initialisation scales (std of a normal), chosen so logits spread over O(1-10) and attention is peaked
# rather than uniform. Norm weights are 1 + NORM_NOISE*N(0,1); biases BIAS_STD*N(0,1).
SCALES = {
    "embed_tied": 0.35,  # tied embedding doubles as lm_head: logit std ~ sqrt(64)*0.35 ~ 2.8
    "embed_untied": 1.0,
    "lm_head": 0.35,
    "q_proj": 0.20,
    "k_proj": 0.20,
    "v_proj": 0.15,
    "o_proj": 0.15,
    "gate_proj": 0.15,
    "up_proj": 0.15,
    "down_proj": 0.10,
}
NORM_NOISE = 0.1
QK_NORM_CENTER = 1.5  # Qwen3 q_norm/k_norm weights: 1.5 + 0.1*N(0,1) (unit-RMS q,k would give flat attention)
BIAS_STD = 0.2

GOLDEN_DOC = {
    "tokens": "i64 [T]: seeded random ids in [3, vocab) (seed = model seed + 1), no BOS",
    "logits": "f32 [T, vocab]: one full forward over `tokens` (eager attention, f32)",
    "hidden.{i}": "f32 [T, hidden]: output of decoder layer i (forward hook on model.model.layers[i]), before the final norm",
    "final_norm": "f32 [T, hidden]: output of model.model.norm (input of lm_head)",
    "greedy": "i64 [N]: greedy continuation: greedy[k] = argmax(greedy_logits[k]) (first index on ties); never stops at EOS",
    "greedy_logits": "f32 [N, vocab]: row 0 = logits at the last prompt position from the prefill (== logits[T-1]); "
                     "row k>=1 = logits of the single-token decode step that fed greedy[k-1] at position T+k-1 "
                     "through the KV cache (past_key_values)",
    "greedy_margin": "f32 [N]: top1 - top2 of greedy_logits[k] (near-tie diagnostic)",
}


# ----------------------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer_json() -> str:
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok.to_str(pretty=True)


def tokenizer_config() -> dict:
    # Written by hand (not by save_pretrained): transformers 5.x would put the template in a separate
    # chat_template.jinja and write tokenizer_class "TokenizersBackend", which 4.x cannot load.
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for i, s in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": "<|im_start|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": COMMON["max_position_embeddings"],
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<|endoftext|>",
    }


# --------------------------------------------------------------------------------------------------------------- model
def reinit_(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):  # tied lm_head appears once
            leaf = name.split(".")[-2] if name.endswith((".weight", ".bias")) else name
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith(".bias"):
                p.copy_(BIAS_STD * noise)
            elif "norm" in leaf:
                center = QK_NORM_CENTER if leaf in ("q_norm", "k_norm") else 1.0
                p.copy_(center + NORM_NOISE * noise)
            elif leaf == "embed_tokens":
                p.copy_(SCALES["embed_tied" if tied else "embed_untied"] * noise)
            elif leaf in SCALES:
                p.copy_(SCALES[leaf] * noise)
            else:
                raise RuntimeError(f"no init rule for parameter {name}")


def build_model_dir(name: str, out_dir: Path) -> None:
    cls_name, kwargs, seed, legacy = MODELS[name]
    cfg_cls = getattr(transformers, cls_name)
    cfg = cfg_cls(**kwargs)
    cfg.architectures = [cls_name.replace("Config", "ForCausalLM")]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    reinit_(model, seed)
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(out_dir, safe_serialization=True)
    cfg_path = out_dir / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json.pop("attn_implementation", None)
    cfg_json.pop("_attn_implementation_autoset", None)
    if legacy is not None:
        cfg_json.pop("rope_parameters")
        cfg_json.update(legacy)
    cfg_path.write_text(json_dumps(cfg_json))
    (out_dir / "tokenizer.json").write_text(build_tokenizer_json())
    (out_dir / "tokenizer_config.json").write_text(json_dumps(tokenizer_config()))


# -------------------------------------------------------------------------------------------------------------- golden
def check_rope(model, rp: dict) -> None:
    """The reloaded model must use exactly the intended RoPE (guards against a silently ignored legacy key)."""
    cfg = model.config
    got = dict(cfg.rope_parameters)
    for k, v in rp.items():
        assert got.get(k) == v, f"rope_parameters[{k}]: got {got.get(k)!r}, want {v!r} (full: {got})"
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    inv_freq = model.model.rotary_emb.inv_freq
    if rp["rope_type"] == "default":
        assert torch.equal(inv_freq, inv)
    elif rp["rope_type"] == "linear":
        assert torch.equal(inv_freq, inv / rp["factor"])
    elif rp["rope_type"] == "llama3":
        n_changed = int((inv_freq != inv).sum())
        assert 0 < n_changed < len(inv), (inv, inv_freq)  # some unchanged, some smoothed/scaled


@torch.no_grad()
def compute_golden(model_dir: Path, seed: int, expected_rope: dict) -> tuple[dict, dict]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg = model.config
    check_rope(model, expected_rope)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(3, cfg.vocab_size, (T_PROMPT,), generator=g, dtype=torch.int64)

    captured = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(_m, _inp, out, i=i):
            captured[f"hidden.{i}"] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()
        hooks.append(layer.register_forward_hook(hook))
    hooks.append(model.model.norm.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("final_norm", out[0].detach().clone())))

    out = model(input_ids=tokens[None], use_cache=True, output_attentions=True)
    for h in hooks:
        h.remove()
    logits = out.logits[0].float().clone()  # [T, vocab]
    # attention diagnostics (not stored): mean over heads/positions of the max attention probability
    att_max = float(torch.stack([a[0].max(-1).values.mean() for a in out.attentions]).mean())

    past = out.past_key_values
    step = logits[-1]
    greedy, greedy_logits = [], []
    for k in range(N_GREEDY):
        greedy_logits.append(step.clone())
        nxt = int(torch.argmax(step))
        greedy.append(nxt)
        if k + 1 == N_GREEDY:
            break
        o = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = o.past_key_values
        step = o.logits[0, -1].float()
    greedy_logits = torch.stack(greedy_logits)
    top2 = torch.topk(greedy_logits, 2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).contiguous()
    assert torch.equal(greedy_logits[0], logits[-1])

    tensors = {"tokens": tokens.contiguous(), "logits": logits.contiguous()}
    for i in range(cfg.num_hidden_layers):
        tensors[f"hidden.{i}"] = captured[f"hidden.{i}"].float().contiguous()
    tensors["final_norm"] = captured["final_norm"].float().contiguous()
    tensors["greedy"] = torch.tensor(greedy, dtype=torch.int64)
    tensors["greedy_logits"] = greedy_logits.contiguous()
    tensors["greedy_margin"] = margin
    diag = {
        "logits_std": float(logits.std()),
        "logits_min": float(logits.min()),
        "logits_max": float(logits.max()),
        "logits_row_range_mean": float((logits.max(-1).values - logits.min(-1).values).mean()),
        "attention_max_prob_mean": att_max,
        "greedy_margin_min": float(margin.min()),
        "hidden_abs_max": float(max(tensors[f"hidden.{i}"].abs().max() for i in range(cfg.num_hidden_layers))),
    }
    return tensors, diag


def tiny_tolerances(n_layers: int) -> dict:
    tol = {
        "tokens": {"exact": True},
        "logits": {"max_abs": 1e-4},
        "final_norm": {"max_abs": 1e-4},
        "greedy": {"exact": True},
        "greedy_logits": {"max_abs": 1e-4},
        "greedy_margin": {"informational": True},
    }
    for i in range(n_layers):
        tol[f"hidden.{i}"] = {"max_abs": 1e-4}
    return tol


def generate_one(name: str, dest_root: Path) -> tuple[dict, dict]:
    """Write golden/tiny/<name>/ under dest_root (atomically per file). Returns (manifest entries, diagnostics)."""
    _cls, kwargs, seed, _legacy = MODELS[name]
    final_dir = dest_root / name
    final_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{name}-", dir=dest_root) as tmp:
        tmp = Path(tmp)
        build_model_dir(name, tmp)
        tensors, diag = compute_golden(tmp, seed, kwargs["rope_parameters"])  # golden from the reloaded on-disk model
        # ONE metadata key only: safetensors serialises __metadata__ from a hash map, so with several keys
        # their order (and thus the file bytes) changes from run to run.
        meta = {"golden": json.dumps({"generator": "gen_tiny.py", "model": name, "dtype": "float32"}, sort_keys=True)}
        (tmp / "golden.safetensors").write_bytes(st_save(tensors, metadata=meta))
        # sanity: transformers can load the tokenizer from tokenizer_config.json, template renders
        tok = transformers.AutoTokenizer.from_pretrained(tmp)
        chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
        assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", repr(chat)
        ids = tok(chat, add_special_tokens=True)["input_ids"]
        assert ids[0] == 1 and 2 in ids, ids
        diag["chat_ids"] = ids
        files = sorted(p.name for p in tmp.iterdir())
        for fname in files:
            atomic_write_bytes(final_dir / fname, (tmp / fname).read_bytes())

    info = generator_info(__file__)
    versions = lib_versions()
    model_sha = sha256_file(final_dir / "model.safetensors")
    rel = f"tiny/{name}"
    entries = {}
    for fname in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json"]:
        entries[f"{rel}/{fname}"] = dict(
            info, kind="tiny-model-file", sha256=sha256_file(final_dir / fname), seed=seed,
            tolerance={"exact": True}, **({"dtype": "float32"} if fname == "model.safetensors" else {}),
        )
    entries[f"{rel}/tokenizer.json"]["tokenizer"] = {
        "corpus": "tiny/tokenizer_corpus.txt", "corpus_sha256": sha256_file(CORPUS), "note": TOKENIZER_SEED_NOTE,
    }
    g_path = final_dir / "golden.safetensors"
    entries[f"{rel}/golden.safetensors"] = dict(
        info,
        kind="tiny-golden",
        sha256=sha256_file(g_path),
        versions=versions,
        torch_threads=torch.get_num_threads(),
        model={"dir": rel, "model_safetensors_sha256": model_sha,
               "config_sha256": sha256_file(final_dir / "config.json"),
               "architecture": MODELS[name][0].replace("Config", "ForCausalLM")},
        seeds={"weights": seed, "tokens": seed + 1},
        dtype="float32",
        attn_implementation="eager",
        prompt_token_ids=[int(x) for x in tensors["tokens"]],
        greedy=[int(x) for x in tensors["greedy"]],
        tensors={k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
        tensor_docs=GOLDEN_DOC,
        tolerance=tiny_tolerances(kwargs["num_hidden_layers"]),
        diagnostics={k: v for k, v in diag.items() if k != "chat_ids"},
    )
    return entries, diag


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(MODELS), help="subset of models (default: all)")
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare bytes with disk")
    args = ap.parse_args()
    names = args.only or list(MODELS)

    if args.check:
        ok = True
        with tempfile.TemporaryDirectory() as td:
            for name in names:
                generate_one(name, Path(td))
                for f in sorted((Path(td) / name).iterdir()):
                    same = (TINY_DIR / name / f.name).exists() and (TINY_DIR / name / f.name).read_bytes() == f.read_bytes()
                    print(f"{name}/{f.name}: {'identical' if same else 'DIFFERENT'}")
                    ok &= same
        print("CHECK", "OK" if ok else "FAILED")
        return 0 if ok else 1

    all_entries = {}
    for name in names:
        t0 = time.time()
        entries, diag = generate_one(name, TINY_DIR)
        all_entries.update(entries)
        size = sum(p.stat().st_size for p in (TINY_DIR / name).iterdir())
        print(f"[{name}] {time.time() - t0:.1f}s  dir {size / 1e6:.3f} MB  {json.dumps(diag)}", flush=True)
    if args.only:  # keep entries of the models not regenerated
        man = json.loads((GOLDEN_DIR / "manifest.json").read_text()) if (GOLDEN_DIR / "manifest.json").exists() else {}
        for k, v in man.get("files", {}).items():
            if v.get("generator") == "gen_tiny.py" and k.split("/")[1] not in names:
                all_entries[k] = v
    all_entries["tiny/tokenizer_corpus.txt"] = dict(
        generator_info(__file__), kind="tokenizer-training-corpus (hand-written input, not generated)",
        sha256=sha256_file(CORPUS))
    update_manifest("gen_tiny.py", all_entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
