//! GGUF bytes → reader → everything the converter derives (tensor plan and values, config,
//! generation and tokenizer configs, tokenizer.json), then the converter itself on small files.
#![no_main]
use kvcompact::gguf::convert::{convert_gguf, generation_config_json, hf_config_json, hf_tensor_plan, hf_tensor_values, tokenizer_config_json, OutDtype};
use kvcompact::gguf::reader::GgufFile;
use kvcompact::gguf::tokenizer_json::tokenizer_json_from_gguf;
use kvcompact_fuzz::check_error;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let g = match GgufFile::from_bytes(data.to_vec(), "fuzz.gguf") {
        Ok(g) => g,
        Err(e) => return check_error(&e),
    };
    for (_, v) in g.metadata() {
        let _ = (v.as_u64(), v.as_i64(), v.as_f64(), v.as_str(), v.type_name());
    }
    for t in g.tensors() {
        let _ = (t.shape(), g.tensor_data(t).len());
    }
    if let Err(e) = hf_config_json(&g, OutDtype::F32) {
        check_error(&e);
    }
    if let Err(e) = generation_config_json(&g) {
        check_error(&e);
    }
    if let Err(e) = tokenizer_config_json(&g) {
        check_error(&e);
    }
    if let Err(e) = tokenizer_json_from_gguf(&g) {
        check_error(&e);
    }
    let plan = match hf_tensor_plan(&g) {
        Ok(p) => p,
        Err(e) => return check_error(&e),
    };
    for t in &plan {
        if let Err(e) = hf_tensor_values(&g, t) {
            check_error(&e);
        }
    }
    // The whole converter, files and all, on a file that got this far.
    let dir = kvcompact_fuzz::fresh_dir("gguf");
    let path = dir.join("in.gguf");
    std::fs::write(&path, data).expect("write the input");
    if let Err(e) = convert_gguf(&path, &dir.join("out"), OutDtype::F32) {
        check_error(&e);
    }
});
