//! Task generators (spec `baselines.md` §4, "generating data without external sources"): every
//! sample is built from a seed, with no download.
//!
//! | task | context | question | answer |
//! |---|---|---|---|
//! | `passkey` | an instruction, then neutral filler sentences with one "The pass key is N. Remember it. N is the pass key." at a chosen depth | "What is the pass key?" | the 5-digit N |
//! | `niah-multikey` | filler with `keys` needles "One of the special magic numbers for K is: V." (RULER niah_multikey_1) at seeded depths | the number for one key (several questions per context) | the 7-digit V |
//! | `variable-tracking` | filler with a chain "VAR A = N." … "VAR B = VAR A." and a distractor chain | the value of the chain's last variable (chain resolution; RULER asks the reverse, listing every variable with a value) | N |
//! | `niah-multivalue` | filler with four needles "One of the special magic numbers for K is: V." for one key K (RULER niah_multivalue) | all the numbers for K | every V (fraction found) |
//! | `niah-multiquery` | filler with `keys` needles for different keys (RULER niah_multiquery) | the numbers for two keys at once | both V (fraction found) |
//! | `cwe` | a numbered list of words in which three words recur often and the rest once (RULER common words extraction) | the three most common words | all three (fraction found) |
//! | `fwe` | "coded text": made-up words drawn from a Zipf law (RULER frequent words extraction, α = 2) | the three most frequent words | all three (fraction found) |
//! | `qa` | a shipped document (or `--qa-docs`) | its questions | short reference strings |
//!
//! Every question carries an `answer_prefix` that starts the assistant's reply ("The pass key
//! is"), so the answer is the next few tokens: accuracy is whether greedy decoding after the
//! prefix reproduces a reference answer (see `eval::metrics`).
//!
//! Lengths are in tokens of the context text (the template adds a few); a generated context is
//! cut back until it fits its target.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sampling::Rng;
use crate::tokenizer::Tokenizer;

/// Every task name `kvcompact eval` accepts.
pub const TASKS: &[&str] = &["passkey", "niah-multikey", "niah-multivalue", "niah-multiquery", "variable-tracking", "cwe", "fwe", "qa"];

/// One question about a context (kvpress column names; also the `--qa-docs` JSON schema).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Question {
    /// The question, asked in a new user turn after the context.
    pub question: String,
    /// Start of the assistant's reply; the answer follows after a space.
    #[serde(default)]
    pub answer_prefix: String,
    /// Accepted answers (any one counts); empty = no accuracy, only log-ppl and KL.
    #[serde(default)]
    pub answers: Vec<String>,
    /// Greedy tokens generated for the answer (default 24).
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    /// Every answer is expected (RULER's multi-value and multi-query needles, word extraction):
    /// accuracy is the fraction of `answers` in the generated text rather than whether any is.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub match_all: bool,
}

fn default_max_new() -> usize {
    24
}

/// One evaluation context with its questions.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Task name, one of [`TASKS`].
    pub task: String,
    /// Unique id within a run, `<task>-<index>`.
    pub id: String,
    /// The context text (the article), before any chat template.
    pub context: String,
    /// Questions asked after the context, each on the same compressed cache.
    pub questions: Vec<Question>,
    /// The sample's own seed (derived from the run seed, the task and the index); it also salts
    /// the evaluation's per-sample seeds.
    pub seed: u64,
    /// Target length, depth(s), document title.
    pub meta: serde_json::Value,
}

/// A QA document: the `--qa-docs` file is a JSON list of these. `document_file` is read relative
/// to the JSON file when `document` is absent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QaDoc {
    /// Document title (recorded in the sample's metadata).
    pub title: String,
    /// The document text; may be empty when `document_file` is given.
    #[serde(default)]
    pub document: String,
    /// Path of a text file holding the document, relative to the JSON file.
    #[serde(default)]
    pub document_file: Option<String>,
    /// The document's questions; the first `qa_questions` are asked.
    pub questions: Vec<Question>,
}

/// The QA documents shipped with kvcompact (original texts written for the project).
pub fn shipped_qa() -> Result<Vec<QaDoc>> {
    let mut docs: Vec<QaDoc> = Vec::new();
    for (name, json, text) in [
        ("data/qa/ferry-timetable.json", include_str!("../../data/qa/ferry-timetable.json"), include_str!("../../data/qa/ferry-timetable.txt")),
        ("data/qa/glassworks.json", include_str!("../../data/qa/glassworks.json"), include_str!("../../data/qa/glassworks.txt")),
        ("data/qa/orchard-station.json", include_str!("../../data/qa/orchard-station.json"), include_str!("../../data/demo/article.txt")),
    ] {
        let mut d: QaDoc = serde_json::from_str(json).map_err(|e| Error::Invalid(format!("{name}: {e}")))?;
        d.document = text.to_string();
        docs.push(d);
    }
    Ok(docs)
}

/// Read a `--qa-docs` file.
pub fn load_qa(path: &std::path::Path) -> Result<Vec<QaDoc>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut docs: Vec<QaDoc> = serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    for d in docs.iter_mut() {
        if d.document.trim().is_empty() {
            let f = d.document_file.as_ref().ok_or_else(|| Error::Invalid(format!("{}: document {:?} has neither document nor document_file", path.display(), d.title)))?;
            let p = path.parent().unwrap_or(std::path::Path::new(".")).join(f);
            d.document = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(docs)
}

/// What the generators need besides the seed.
#[derive(Debug, Clone)]
pub struct TaskConfig {
    /// Context lengths (tokens) cycled over the samples of the synthetic tasks.
    pub lengths: Vec<usize>,
    /// Needle depths in [0, 1] cycled over the samples.
    pub depths: Vec<f64>,
    /// Needles per niah-multikey context (at least 1).
    pub keys: usize,
    /// Needles asked per niah-multikey context (clamped to [1, keys]).
    pub keys_asked: usize,
    /// Questions asked per QA document (the first ones).
    pub qa_questions: usize,
    /// The QA documents; sample i of `qa` is document i.
    pub qa_docs: Vec<QaDoc>,
}

/// Neutral filler (RULER "noise" style), repeated in this order.
const FILLER: [&str; 6] = [
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "The river runs to the sea.",
    "The hills are quiet.",
    "Here we go again.",
];

/// Words for needle keys (adjective-noun pairs).
const ADJ: [&str; 24] = [
    "quiet", "amber", "silver", "rapid", "gentle", "frozen", "hollow", "bright", "narrow", "golden", "misty", "rusty", "humble",
    "velvet", "crimson", "distant", "lucky", "sharp", "wooden", "lunar", "brave", "tidy", "scarlet", "patient",
];
const NOUN: [&str; 24] = [
    "harbor", "lantern", "meadow", "falcon", "violin", "compass", "orchard", "glacier", "teapot", "canyon", "ribbon", "beacon",
    "walrus", "pepper", "anchor", "tunnel", "saddle", "pebble", "kettle", "marble", "thistle", "quarry", "feather", "ladder",
];

/// Build `n` samples of `task` from `seed`.
pub fn generate(task: &str, n: usize, seed: u64, cfg: &TaskConfig, tok: &Tokenizer) -> Result<Vec<Sample>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_add(fxhash(task));
        let len = cfg.lengths[i % cfg.lengths.len().max(1)];
        let depth = cfg.depths[i % cfg.depths.len().max(1)];
        let sample = match task {
            "passkey" => passkey(i, s, len, depth, tok)?,
            "niah-multikey" => multikey(i, s, len, cfg, tok)?,
            "variable-tracking" => variable_tracking(i, s, len, tok)?,
            "niah-multivalue" => multivalue(i, s, len, tok)?,
            "niah-multiquery" => multiquery(i, s, len, cfg, tok)?,
            "cwe" => common_words(i, s, len, tok)?,
            "fwe" => frequent_words(i, s, len, tok)?,
            "qa" => {
                if i >= cfg.qa_docs.len() {
                    break; // one sample per document
                }
                qa(i, s, &cfg.qa_docs[i], cfg.qa_questions)
            }
            _ => return Err(Error::Invalid(format!("unknown task {task:?} (expected one of {})", TASKS.join(", ")))),
        };
        out.push(sample);
    }
    Ok(out)
}

/// A small stable hash of a task name (so tasks draw different streams from one seed).
fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Filler sentences plus `inserts` (each at a fraction of the way through), with a header, cut
/// to at most `target` tokens. Inserts are placed between sentences.
fn haystack(tok: &Tokenizer, header: &str, inserts: &[(f64, String)], target: usize) -> Result<String> {
    let fixed: usize = tok.encode(header, false)?.len() + inserts.iter().map(|(_, s)| tok.encode(s, false).map(|v| v.len() + 1)).sum::<Result<usize>>()?;
    let per: Vec<usize> = FILLER.iter().map(|s| tok.encode(&format!(" {s}"), false).map(|v| v.len())).collect::<Result<_>>()?;
    let mut n_fill = 0;
    let mut total = fixed;
    while total + per[n_fill % FILLER.len()] <= target {
        total += per[n_fill % FILLER.len()];
        n_fill += 1;
    }
    loop {
        let text = assemble(header, inserts, n_fill);
        let len = tok.encode(&text, false)?.len();
        if len <= target || n_fill == 0 {
            return Ok(text);
        }
        n_fill -= (len - target).div_ceil(3).clamp(1, n_fill);
    }
}

fn assemble(header: &str, inserts: &[(f64, String)], n_fill: usize) -> String {
    let mut order: Vec<(usize, &str)> = inserts.iter().map(|(d, s)| (((d.clamp(0.0, 1.0)) * n_fill as f64).round() as usize, s.as_str())).collect();
    order.sort_by_key(|x| x.0);
    let mut text = String::from(header);
    let mut k = 0;
    for i in 0..=n_fill {
        while k < order.len() && order[k].0 == i {
            text.push(' ');
            text.push_str(order[k].1);
            k += 1;
        }
        if i < n_fill {
            text.push(' ');
            text.push_str(FILLER[i % FILLER.len()]);
        }
    }
    text
}

fn passkey(i: usize, seed: u64, len: usize, depth: f64, tok: &Tokenizer) -> Result<Sample> {
    let mut rng = Rng::new(seed);
    let key = 10_000 + rng.below(90_000);
    let header = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it. I will ask you about it later.\n";
    let needle = format!("The pass key is {key}. Remember it. {key} is the pass key.");
    let context = haystack(tok, header, &[(depth, needle)], len)?;
    Ok(Sample {
        task: "passkey".into(),
        id: format!("passkey-{i}"),
        context,
        questions: vec![Question {
            question: "What is the pass key? Answer with the number only.".into(),
            answer_prefix: "The pass key is".into(),
            answers: vec![key.to_string()],
            max_new_tokens: 8,
            match_all: false,
        }],
        seed,
        meta: serde_json::json!({"length": len, "depth": depth}),
    })
}

fn key_name(rng: &mut Rng, taken: &[String]) -> String {
    loop {
        let k = format!("{}-{}", ADJ[rng.below(ADJ.len() as u64) as usize], NOUN[rng.below(NOUN.len() as u64) as usize]);
        if !taken.contains(&k) {
            return k;
        }
    }
}

fn multikey(i: usize, seed: u64, len: usize, cfg: &TaskConfig, tok: &Tokenizer) -> Result<Sample> {
    let mut rng = Rng::new(seed);
    let mut keys: Vec<String> = Vec::new();
    let mut inserts = Vec::new();
    let mut values = Vec::new();
    for _ in 0..cfg.keys.max(1) {
        let k = key_name(&mut rng, &keys);
        let v = 1_000_000 + rng.below(9_000_000);
        let depth = 0.05 + 0.9 * rng.next_f64();
        inserts.push((depth, format!("One of the special magic numbers for {k} is: {v}.")));
        keys.push(k);
        values.push(v);
    }
    let header = "Some special magic numbers are hidden inside the following text. Make sure to memorize them. I will quiz you about the numbers afterwards.\n";
    let context = haystack(tok, header, &inserts, len)?;
    // Ask a seeded choice of keys.
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    for a in 0..idx.len() {
        let b = a + rng.below((idx.len() - a) as u64) as usize;
        idx.swap(a, b);
    }
    let questions = idx[..cfg.keys_asked.clamp(1, keys.len())]
        .iter()
        .map(|&j| Question {
            question: format!("What is the special magic number for {} mentioned in the text above? Answer with the number only.", keys[j]),
            answer_prefix: format!("The special magic number for {} is", keys[j]),
            answers: vec![values[j].to_string()],
            max_new_tokens: 12,
            match_all: false,
        })
        .collect();
    Ok(Sample {
        task: "niah-multikey".into(),
        id: format!("niah-multikey-{i}"),
        context,
        questions,
        seed,
        meta: serde_json::json!({"length": len, "keys": keys, "depths": inserts.iter().map(|x| x.0).collect::<Vec<_>>()}),
    })
}

/// A seeded 7-digit value per needle and a depth in [0.05, 0.95].
fn needle_value(rng: &mut Rng) -> (u64, f64) {
    (1_000_000 + rng.below(9_000_000), 0.05 + 0.9 * rng.next_f64())
}

fn list_answer(items: &[String]) -> String {
    items.join(", ")
}

fn multivalue(i: usize, seed: u64, len: usize, tok: &Tokenizer) -> Result<Sample> {
    let mut rng = Rng::new(seed);
    let key = key_name(&mut rng, &[]);
    let mut inserts = Vec::new();
    let mut values: Vec<String> = Vec::new();
    while values.len() < 4 {
        let (v, depth) = needle_value(&mut rng);
        if values.contains(&v.to_string()) {
            continue;
        }
        inserts.push((depth, format!("One of the special magic numbers for {key} is: {v}.")));
        values.push(v.to_string());
    }
    let header = "Some special magic numbers are hidden inside the following text. Make sure to memorize them. I will quiz you about the numbers afterwards.\n";
    let context = haystack(tok, header, &inserts, len)?;
    Ok(Sample {
        task: "niah-multivalue".into(),
        id: format!("niah-multivalue-{i}"),
        context,
        questions: vec![Question {
            question: format!("What are all the special magic numbers for {key} mentioned in the text above? List the numbers only."),
            answer_prefix: format!("The special magic numbers for {key} are"),
            answers: values.clone(),
            max_new_tokens: 40,
            match_all: true,
        }],
        seed,
        meta: serde_json::json!({"length": len, "key": key, "depths": inserts.iter().map(|x| x.0).collect::<Vec<_>>(), "answer": list_answer(&values)}),
    })
}

fn multiquery(i: usize, seed: u64, len: usize, cfg: &TaskConfig, tok: &Tokenizer) -> Result<Sample> {
    let mut rng = Rng::new(seed);
    let mut keys: Vec<String> = Vec::new();
    let mut inserts = Vec::new();
    let mut values = Vec::new();
    for _ in 0..cfg.keys.max(2) {
        let k = key_name(&mut rng, &keys);
        let (v, depth) = needle_value(&mut rng);
        inserts.push((depth, format!("One of the special magic numbers for {k} is: {v}.")));
        keys.push(k);
        values.push(v.to_string());
    }
    let header = "Some special magic numbers are hidden inside the following text. Make sure to memorize them. I will quiz you about the numbers afterwards.\n";
    let context = haystack(tok, header, &inserts, len)?;
    // Two distinct keys asked together.
    let a = rng.below(keys.len() as u64) as usize;
    let b = (a + 1 + rng.below(keys.len() as u64 - 1) as usize) % keys.len();
    Ok(Sample {
        task: "niah-multiquery".into(),
        id: format!("niah-multiquery-{i}"),
        context,
        questions: vec![Question {
            question: format!("What are the special magic numbers for {} and {} mentioned in the text above? List the numbers only.", keys[a], keys[b]),
            answer_prefix: format!("The special magic numbers for {} and {} are", keys[a], keys[b]),
            answers: vec![values[a].clone(), values[b].clone()],
            max_new_tokens: 24,
            match_all: true,
        }],
        seed,
        meta: serde_json::json!({"length": len, "keys": keys, "asked": [&keys[a], &keys[b]], "depths": inserts.iter().map(|x| x.0).collect::<Vec<_>>()}),
    })
}

/// Plain English words for the word-extraction lists (the needle-key words too).
fn word_pool() -> Vec<&'static str> {
    const MORE: [&str; 48] = [
        "apple", "river", "candle", "window", "garden", "pencil", "rocket", "blanket", "button", "castle", "dragon", "engine", "forest",
        "guitar", "hammer", "island", "jacket", "kitten", "lizard", "mirror", "needle", "ocean", "parrot", "puzzle", "rabbit", "sandal",
        "tomato", "umbrella", "valley", "wallet", "yogurt", "zipper", "bottle", "carpet", "desert", "feast", "goblet", "helmet", "igloo",
        "jungle", "kernel", "lemon", "magnet", "napkin", "oyster", "planet", "quilt", "saucer",
    ];
    let mut v: Vec<&str> = ADJ.iter().chain(NOUN.iter()).copied().chain(MORE.iter().copied()).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Shuffle in place with the seeded generator.
fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for a in 0..v.len() {
        let b = a + rng.below((v.len() - a) as u64) as usize;
        v.swap(a, b);
    }
}

/// The longest text `build(n)` (n items, n from `max` down) whose tokens fit `target`.
fn fit_items(tok: &Tokenizer, target: usize, max: usize, build: &dyn Fn(usize) -> String) -> Result<String> {
    let mut n = max;
    loop {
        let text = build(n);
        let len = tok.encode(&text, false)?.len();
        if len <= target || n <= 1 {
            return Ok(text);
        }
        // Shrink in proportion to the excess, by one at least.
        n -= ((len - target) * n / len).max(1).min(n - 1);
    }
}

fn common_words(i: usize, seed: u64, len: usize, tok: &Tokenizer) -> Result<Sample> {
    let mut rng = Rng::new(seed);
    let mut pool = word_pool();
    shuffle(&mut pool, &mut rng);
    let common: Vec<String> = pool[..3].iter().map(|w| w.to_string()).collect();
    let rare: Vec<&str> = pool[3..].to_vec();
    // Items are "k. word" (about 3 tokens each): a quarter of the list is the common words.
    let n_max = (len / 3).max(8);
    let order_seed = rng.next_u64();
    let build = |n: usize| {
        let reps = (n / 12).max(2);
        let mut items: Vec<&str> = Vec::new();
        for w in &common {
            items.extend(std::iter::repeat_n(w.as_str(), reps));
        }
        let n_rare = n.saturating_sub(items.len()).min(rare.len());
        items.extend(&rare[..n_rare]);
        shuffle(&mut items, &mut Rng::new(order_seed));
        let mut text = String::from("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n");
        for (k, w) in items.iter().enumerate() {
            text.push_str(&format!("{}. {w}\n", k + 1));
        }
        text
    };
    let context = fit_items(tok, len, n_max, &build)?;
    Ok(Sample {
        task: "cwe".into(),
        id: format!("cwe-{i}"),
        context,
        questions: vec![Question {
            question: "What are the 3 most common words in the list above? Answer with the words only.".into(),
            answer_prefix: "The 3 most common words in the list are".into(),
            answers: common.clone(),
            max_new_tokens: 16,
            match_all: true,
        }],
        seed,
        meta: serde_json::json!({"length": len, "answer": list_answer(&common)}),
    })
}

fn frequent_words(i: usize, seed: u64, len: usize, tok: &Tokenizer) -> Result<Sample> {
    let mut rng = Rng::new(seed);
    // Made-up lowercase words; rank r is drawn with probability ∝ 1/r² (Zipf, α = 2).
    let mut vocab: Vec<String> = Vec::new();
    while vocab.len() < 40 {
        let w: String = (0..3 + rng.below(3)).map(|_| (b'a' + rng.below(26) as u8) as char).collect();
        if !vocab.contains(&w) {
            vocab.push(w);
        }
    }
    let cdf: Vec<f64> = {
        let w: Vec<f64> = (1..=vocab.len()).map(|r| 1.0 / (r * r) as f64).collect();
        let z: f64 = w.iter().sum();
        w.iter().scan(0.0, |a, x| {
            *a += x / z;
            Some(*a)
        }).collect()
    };
    let n_max = (len / 2).max(8);
    let draws: Vec<usize> = (0..n_max).map(|_| {
        let u = rng.next_f64();
        cdf.iter().position(|&c| u < c).unwrap_or(vocab.len() - 1)
    }).collect();
    // The three most frequent words of the text actually kept (ties broken by rank, so the
    // answer is well defined; the Zipf law makes ties among the top three rare).
    let top3 = |n: usize| {
        let mut count = vec![0usize; vocab.len()];
        draws[..n].iter().for_each(|&d| count[d] += 1);
        let mut idx: Vec<usize> = (0..vocab.len()).collect();
        idx.sort_by(|&a, &b| count[b].cmp(&count[a]).then(a.cmp(&b)));
        idx[..3].iter().map(|&k| vocab[k].clone()).collect::<Vec<_>>()
    };
    let build = |n: usize| {
        let mut text = String::from("Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words.\n");
        text.push_str(&draws[..n].iter().map(|&d| vocab[d].as_str()).collect::<Vec<_>>().join(" "));
        text.push('\n');
        text
    };
    let context = fit_items(tok, len, n_max, &build)?;
    let kept = context.lines().nth(1).map_or(0, |l| l.split(' ').count());
    let top = top3(kept.max(1));
    Ok(Sample {
        task: "fwe".into(),
        id: format!("fwe-{i}"),
        context,
        questions: vec![Question {
            question: "What are the three most frequently appeared words in the coded text above? Answer with the words only.".into(),
            answer_prefix: "The three most frequently appeared words are".into(),
            answers: top.clone(),
            max_new_tokens: 16,
            match_all: true,
        }],
        seed,
        meta: serde_json::json!({"length": len, "answer": list_answer(&top)}),
    })
}

fn var_name(rng: &mut Rng, taken: &[String]) -> String {
    loop {
        let s: String = (0..5).map(|_| (b'A' + rng.below(26) as u8) as char).collect();
        if !taken.contains(&s) {
            return s;
        }
    }
}

fn variable_tracking(i: usize, seed: u64, len: usize, tok: &Tokenizer) -> Result<Sample> {
    let mut rng = Rng::new(seed);
    let mut names: Vec<String> = Vec::new();
    for _ in 0..4 {
        let n = var_name(&mut rng, &names);
        names.push(n);
    }
    let (value, other) = (10_000 + rng.below(90_000), 10_000 + rng.below(90_000));
    // The asked chain A → B and a distractor chain C → D, each in order through the text.
    let d = |lo: f64, rng: &mut Rng| lo + 0.35 * rng.next_f64();
    let inserts = vec![
        (d(0.05, &mut rng), format!("VAR {} = {value}.", names[0])),
        (d(0.55, &mut rng), format!("VAR {} = VAR {}.", names[1], names[0])),
        (d(0.05, &mut rng), format!("VAR {} = {other}.", names[2])),
        (d(0.55, &mut rng), format!("VAR {} = VAR {}.", names[3], names[2])),
    ];
    let header = "Memorize and track the chain of variable assignments hidden in the following text.\n";
    let context = haystack(tok, header, &inserts, len)?;
    Ok(Sample {
        task: "variable-tracking".into(),
        id: format!("variable-tracking-{i}"),
        context,
        questions: vec![Question {
            question: format!("Follow the assignments in the text above: what number is VAR {} equal to? Answer with the number only.", names[1]),
            answer_prefix: format!("VAR {} is equal to", names[1]),
            answers: vec![value.to_string()],
            max_new_tokens: 8,
            match_all: false,
        }],
        seed,
        meta: serde_json::json!({"length": len, "chain": [&names[0], &names[1]], "distractor": [&names[2], &names[3]]}),
    })
}

fn qa(i: usize, seed: u64, doc: &QaDoc, n_questions: usize) -> Sample {
    let qs: Vec<Question> = doc.questions.iter().take(n_questions.max(1)).cloned().collect();
    Sample {
        task: "qa".into(),
        id: format!("qa-{i}"),
        context: doc.document.trim().to_string(),
        questions: qs,
        seed,
        meta: serde_json::json!({"title": doc.title}),
    }
}

/// One JSONL row per question with kvpress's column names (context, question, answer_prefix,
/// answers, max_new_tokens) plus the seed and sample id, so external sets can drop in.
pub fn to_jsonl(samples: &[Sample]) -> String {
    let mut out = String::new();
    for s in samples {
        for q in &s.questions {
            let row = serde_json::json!({
                "task": s.task, "id": s.id, "context": s.context, "question": q.question,
                "answer_prefix": q.answer_prefix, "answers": q.answers, "max_new_tokens": q.max_new_tokens,
                "seed": s.seed, "meta": s.meta,
            });
            out.push_str(&row.to_string());
            out.push('\n');
        }
    }
    out
}
