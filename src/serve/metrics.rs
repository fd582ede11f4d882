//! `GET /metrics`: Prometheus text exposition of what the server does.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Every metric the server exports (names prefixed `kvcompact_`).
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route and status.
    pub requests: IntCounterVec,
    /// Prompt tokens admitted.
    pub prompt_tokens: IntCounter,
    /// Tokens generated.
    pub generated_tokens: IntCounter,
    /// Sequences decoded per batched step.
    pub batch_size: Histogram,
    /// Requests waiting for admission.
    pub queue_depth: IntGauge,
    /// Sequences admitted and not finished.
    pub running: IntGauge,
    /// Real KV bytes held by running sequences (a cache being compacted counts until it is back).
    pub kv_bytes: IntGauge,
    /// Bytes of documents kept in RAM.
    pub documents_hot_bytes: IntGauge,
    /// Bytes of documents dropped from RAM to make room under the KV budget.
    pub documents_shed_bytes: IntCounter,
    /// Compactions finished (memory pressure and documents).
    pub compactions: IntCounter,
    /// Compactions running in the background now (0 or 1).
    pub compactions_in_flight: IntGauge,
    /// KV bytes freed by compaction under memory pressure.
    pub bytes_freed: IntCounter,
    /// Seconds per compaction under memory pressure.
    pub compact_seconds: Histogram,
    /// Requests refused for lack of KV memory (429).
    pub refused: IntCounter,
    /// Sequences dropped because their client went away.
    pub cancelled: IntCounter,
    /// Panics caught in the engine: one per sequence failed by a panic in its prefill, decode or
    /// compaction, or per batched step whose panic no sequence reproduced alone (the server went
    /// on).
    pub panics: IntCounter,
    /// Seconds from a request's arrival to its first token.
    pub ttft: Histogram,
    /// Seconds between consecutive tokens of a sequence.
    pub itl: Histogram,
}

impl Metrics {
    /// All metrics, registered.
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("kvcompact".into()), None).expect("a valid prefix");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let requests = IntCounterVec::new(Opts::new("http_requests_total", "HTTP requests by route and status"), &["route", "status"]).expect("valid metric");
        registry.register(Box::new(requests.clone())).expect("unique metric");
        let secs = vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        Metrics {
            requests,
            prompt_tokens: counter("prompt_tokens_total", "Prompt tokens admitted"),
            generated_tokens: counter("generated_tokens_total", "Tokens generated"),
            batch_size: hist("decode_batch_size", "Sequences decoded per batched step", vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            queue_depth: gauge("queue_depth", "Requests waiting for admission"),
            running: gauge("running_sequences", "Sequences admitted and not finished"),
            kv_bytes: gauge("kv_bytes", "Real KV bytes held by running sequences (a cache being compacted counts until it is back)"),
            documents_hot_bytes: gauge("documents_hot_bytes", "Bytes of compacted documents kept in RAM"),
            documents_shed_bytes: counter("documents_shed_bytes_total", "Bytes of documents dropped from RAM to make room under the KV budget"),
            compactions: counter("compactions_total", "Compactions finished (memory pressure and documents)"),
            compactions_in_flight: gauge("compactions_in_flight", "Compactions running in the background now"),
            bytes_freed: counter("compaction_freed_bytes_total", "KV bytes freed by compaction under memory pressure"),
            compact_seconds: hist("compaction_seconds", "Seconds per compaction under memory pressure", secs.clone()),
            refused: counter("refused_total", "Requests refused for lack of KV memory (429)"),
            cancelled: counter("cancelled_total", "Sequences dropped because the client went away"),
            panics: counter("engine_panics_total", "Panics caught in the engine, each failing only the sequence that raised it (the server went on)"),
            ttft: hist("time_to_first_token_seconds", "Seconds from a request's arrival to its first token", secs.clone()),
            itl: hist("inter_token_seconds", "Seconds between consecutive tokens of a sequence", vec![0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]),
            registry,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
