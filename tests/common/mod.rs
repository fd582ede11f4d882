//! Helpers shared by the integration tests: golden-file access and model paths.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kvcompact::tensor_file::{load_safetensors, TensorData};

/// The repository root: `KVCOMPACT_REPO` when set (a test binary built elsewhere, as
/// benches/gpu_check.sh runs a prebuilt one), else where it was built.
pub fn repo() -> PathBuf {
    std::env::var_os("KVCOMPACT_REPO").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn golden(rel: &str) -> PathBuf {
    repo().join("golden").join(rel)
}

/// The converted default model; tests that need it fail (not skip) with what to run.
pub fn default_model() -> PathBuf {
    let home = std::env::var_os("KVCOMPACT_HOME").map(PathBuf::from).unwrap_or_else(|| repo().join("models"));
    let dir = home.join("smollm2-135m-instruct");
    assert!(
        dir.join("config.json").exists() && dir.join("model.safetensors").exists(),
        "default model not found at {}: run `cargo run --release -- fetch-model` first",
        dir.display()
    );
    dir
}

pub struct Golden {
    pub path: PathBuf,
    map: HashMap<String, (Vec<usize>, TensorData)>,
}

impl Golden {
    pub fn load(path: &Path) -> Golden {
        let map = load_safetensors(path).unwrap_or_else(|e| panic!("loading golden {}: {e}", path.display()));
        Golden { path: path.into(), map }
    }

    pub fn shape(&self, name: &str) -> &[usize] {
        &self.get(name).0
    }

    fn get(&self, name: &str) -> &(Vec<usize>, TensorData) {
        self.map.get(name).unwrap_or_else(|| panic!("golden {} has no tensor {name}", self.path.display()))
    }

    pub fn f32(&self, name: &str) -> &[f32] {
        match &self.get(name).1 {
            TensorData::F32(v) => v,
            _ => panic!("golden tensor {name} is not f32"),
        }
    }

    pub fn ids(&self, name: &str) -> Vec<u32> {
        match &self.get(name).1 {
            TensorData::I64(v) => v.iter().map(|&x| u32::try_from(x).expect("token id fits u32")).collect(),
            _ => panic!("golden tensor {name} is not integer"),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

/// Jaccard overlap |a ∩ b| / |a ∪ b| of two index sets (1 when both are empty).
pub fn jaccard(a: &[usize], b: &[usize]) -> f64 {
    let (a, b): (std::collections::BTreeSet<_>, std::collections::BTreeSet<_>) = (a.iter().collect(), b.iter().collect());
    let u = a.union(&b).count();
    if u == 0 {
        1.0
    } else {
        a.intersection(&b).count() as f64 / u as f64
    }
}

/// Run the built `kvcompact` binary: (exit code, stdout, stderr).
pub fn kvc(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvcompact")).args(args).output().expect("run kvcompact");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}
