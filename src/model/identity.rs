//! A model's identity: a fingerprint that does not depend on the storage dtype, and what a
//! compacted-cache file records of the model it was made for.

use crate::cache::file::ModelId;
use crate::model::Model;

impl Model {
    /// A fingerprint of a model that does not depend on its storage dtype: the normalised config,
    /// every tensor's name and shape, and bf16-rounded samples of a few weight rows.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let model = self;
        let c = &model.config;
        let mut h = Sha256::new();
        h.update(format!(
            "{}|{}|{}|{}|{}|{}|{}|{}|{}|{:?}|{}",
            c.arch.name(),
            c.hidden_size,
            c.intermediate_size,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.vocab_size,
            c.rope_theta,
            c.rope_scaling,
            c.tie_word_embeddings
        ));
        let w = &model.weights;
        let mut names: Vec<&str> = w.store.names().collect();
        names.sort_unstable();
        for n in names {
            h.update(n.as_bytes());
        }
        let mut row = vec![0.0f32; c.hidden_size];
        let emb = w.view(&w.embed);
        for r in [0, 1, c.vocab_size / 2, c.vocab_size - 1] {
            kvcompact_kernels::widen_rows(emb, r, 1, c.hidden_size, &mut row);
            for x in &row {
                h.update(half::bf16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
        if let Some(l) = w.layers.last() {
            let mut r = vec![0.0f32; l.wq.cols];
            kvcompact_kernels::widen_rows(w.view(&l.wq), 0, 1, l.wq.cols, &mut r);
            for x in &r {
                h.update(half::bf16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
        let d = h.finalize();
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// What a compacted-cache file records of this model and checks when loaded.
    pub fn cache_id(&self) -> ModelId {
        let c = &self.config;
        ModelId {
            fingerprint: self.fingerprint(),
            dir: self.dir.display().to_string(),
            n_layers: c.n_layers,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            max_positions: c.max_position_embeddings,
        }
    }
}
