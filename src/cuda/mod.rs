//! The GPU path (`--features cuda`): decode attention over the ragged β cache and Attention
//! Matching's n×T products, each checked against its CPU twin (tests/cuda.rs).
//!
//! cudarc loads libcuda, NVRTC and cuBLAS when first used, so the feature builds anywhere; the
//! kernels (`kernels.cu`, included as a string) are compiled by NVRTC for the GPU's compute
//! capability on first use and the PTX is cached on disk (`$KVCOMPACT_CUDA_CACHE`, else
//! `$XDG_CACHE_HOME/kvcompact/cuda` or `~/.cache/kvcompact/cuda`), keyed by a hash of the source,
//! the architecture and the NVRTC version. One process-wide [`Gpu`] serialises its calls (a mutex
//! around one stream): heads compacted in parallel on the CPU pool queue for it in turn.

pub mod am;
pub mod attention;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::{Error, Result};

/// The kernels' CUDA C source (compiled at run time; `nvcc --ptx` checks it in CI).
pub const KERNEL_SOURCE: &str = include_str!("kernels.cu");

/// Every kernel entry point in [`KERNEL_SOURCE`].
pub const KERNELS: &[&str] = &[
    "decode_attention_f32",
    "decode_attention_bf16",
    "row_softmax_f32",
    "row_softmax_f64",
    "column_scores_f32",
    "column_scores_f64",
];

/// The device, its stream, cuBLAS and the loaded kernels.
pub struct Gpu {
    /// "NVIDIA H100 80GB HBM3 (sm_90)".
    pub name: String,
    inner: Mutex<Inner>,
}

pub(crate) struct Inner {
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    pub(crate) module: Arc<CudaModule>,
}

impl Inner {
    pub(crate) fn func(&self, name: &str) -> Result<CudaFunction> {
        self.module.load_function(name).map_err(|e| dev_err(&format!("kernel {name}"), e))
    }
}

/// The process-wide GPU (device 0), opened and compiled on first use; the error is one line
/// and is returned again on every later call.
pub fn gpu() -> Result<&'static Gpu> {
    static GPU: OnceLock<std::result::Result<Gpu, String>> = OnceLock::new();
    GPU.get_or_init(|| Gpu::open().map_err(|e| e.to_string())).as_ref().map_err(|m| Error::Device(m.clone()))
}

impl Gpu {
    fn open() -> Result<Gpu> {
        // cudarc panics when a library is missing: look for each one first.
        // SAFETY: these only try to dlopen the library names.
        let (driver, nvrtc, blas) = unsafe {
            (cudarc::driver::sys::is_culib_present(), cudarc::nvrtc::sys::is_culib_present(), cudarc::cublas::sys::is_culib_present())
        };
        if !driver {
            return Err(Error::Device("--device cuda: no CUDA driver (libcuda.so not found): this machine has no NVIDIA GPU driver".into()));
        }
        if !nvrtc {
            return Err(Error::Device(
                "--device cuda: NVRTC (libnvrtc.so) not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` and add its lib directory to LD_LIBRARY_PATH".into(),
            ));
        }
        if !blas {
            return Err(Error::Device(
                "--device cuda: cuBLAS (libcublas.so) not found: install the CUDA toolkit or `pip install nvidia-cublas` and add its lib directory to LD_LIBRARY_PATH".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| dev_err("--device cuda: the CUDA driver did not start", e))?;
        if count < 1 {
            return Err(Error::Device("--device cuda: the CUDA driver sees no GPU".into()));
        }
        let ctx = CudaContext::new(0).map_err(|e| dev_err("--device cuda: opening GPU 0", e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| dev_err("--device cuda: compute capability", e))?;
        let arch = format!("compute_{major}{minor}");
        let name = format!("{} (sm_{major}{minor})", ctx.name().unwrap_or_else(|_| "GPU 0".into()));
        let ptx = cached_ptx(&arch)?;
        let module = ctx.load_module(ptx).map_err(|e| dev_err("--device cuda: loading the kernels (is the driver older than NVRTC?)", e))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| dev_err("--device cuda: cuBLAS", e))?;
        Ok(Gpu { name, inner: Mutex::new(Inner { stream, blas, module }) })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A CUDA failure as one line, with what was being done.
pub(crate) fn dev_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("{what}: {}", format!("{e:?}").replace('\n', " ")))
}

/// Compile [`KERNEL_SOURCE`] with NVRTC for `arch` (`compute_80`, …) and return the PTX text.
/// Needs only libnvrtc, not a GPU (the tests compile every kernel this way).
pub fn compile_ptx(arch: &str) -> Result<String> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Device("NVRTC (libnvrtc.so) not found".into()));
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some("kernels.cu".into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SOURCE, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            Error::Device(format!("NVRTC could not compile kernels.cu: {}", log.to_string_lossy().trim().replace('\n', " | ")))
        }
        other => dev_err("NVRTC", other),
    })?;
    Ok(ptx.to_src())
}

/// [`compile_ptx`] through the on-disk cache (best effort: an unwritable cache only costs time).
fn cached_ptx(arch: &str) -> Result<Ptx> {
    let mut version = (0, 0);
    // SAFETY: plain out-parameters; the library is present (checked by the caller).
    unsafe {
        cudarc::nvrtc::sys::nvrtcVersion(&mut version.0, &mut version.1);
    }
    let key = fnv1a(format!("{KERNEL_SOURCE}\0{arch}\0{}.{}", version.0, version.1).as_bytes());
    let file = cache_dir().map(|d| d.join(format!("kernels-{key:016x}-{arch}.ptx")));
    if let Some(text) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
        return Ok(Ptx::from_src(text));
    }
    let text = compile_ptx(arch)?;
    if let Some(f) = file {
        let tmp = f.with_extension(format!("tmp{}", std::process::id()));
        if f.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok()) && std::fs::write(&tmp, &text).is_ok() {
            let _ = std::fs::rename(&tmp, &f);
        }
    }
    Ok(Ptx::from_src(text))
}

fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("KVCOMPACT_CUDA_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("kvcompact/cuda")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/kvcompact/cuda")))
}

/// 64-bit FNV-1a (a stable hash for the cache key; not for security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}
