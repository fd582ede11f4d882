//! Request bodies from strangers through the real router and engine (tiny golden model, in
//! process, no socket): the first byte picks the route, the rest is the body. Every answer is a
//! success or an OpenAI-shaped JSON error with a one-line message; never a 500, never a hang.
#![no_main]
use std::path::Path;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use kvcompact::model::Model;
use kvcompact::serve::documents::Store;
use kvcompact::serve::metrics::Metrics;
use kvcompact::serve::routes::{router, AppState};
use kvcompact::serve::scheduler::{Engine, EngineConfig, Job};
use kvcompact::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const ROUTES: [&str; 4] = ["/v1/chat/completions", "/v1/completions", "/v1/documents", "/v1/chat/completions"];

fn app() -> &'static (Router, tokio::runtime::Runtime) {
    static APP: OnceLock<(Router, tokio::runtime::Runtime)> = OnceLock::new();
    APP.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/tiny/llama-gqa");
        let model = Arc::new(Model::load(&dir).expect("the tiny golden model"));
        let tok = Arc::new(Tokenizer::load(&dir, &model.config).expect("its tokenizer"));
        let store = Store::open(&kvcompact_fuzz::scratch().join("documents"), &model, 1 << 20).expect("a store");
        let metrics = Arc::new(Metrics::new());
        let (jobs, inbox) = std::sync::mpsc::channel::<Job>();
        let state = AppState {
            jobs,
            tok: tok.clone(),
            model_name: "tiny".into(),
            max_context: model.config.max_position_embeddings,
            store: store.clone(),
            metrics: metrics.clone(),
            api_key: None,
            policy: "am-highest".into(),
            fail_point: None,
        };
        let cfg = EngineConfig { max_batch: 4, kv_budget_bytes: Some(64 << 10), policy: "am-highest".into(), ratio: 4.0, keep_recent: 8, prefill_chunk: 64, hold_compactions: None, global_budgets: true };
        std::thread::spawn(move || Engine::new(model, tok, cfg, store, metrics).run(inbox));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        (router(state, 1 << 20), rt)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let (app, rt) = app();
    let uri = ROUTES[pick as usize % ROUTES.len()];
    let req = Request::post(uri).header("content-type", "application/json").body(Body::from(body.to_vec())).expect("a request");
    let (status, bytes) = rt.block_on(async {
        let resp = app.clone().oneshot(req).await.expect("the router is infallible");
        let status = resp.status();
        (status, axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("the body"))
    });
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "500 for {:?}: {:?}", String::from_utf8_lossy(body), String::from_utf8_lossy(&bytes));
    if !status.is_success() {
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("an error body is JSON");
        let msg = v["error"]["message"].as_str().expect("error.message");
        kvcompact_fuzz::check_error(&msg);
    }
});
