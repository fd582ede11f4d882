//! Where the heavy math runs: the CPU (always) or a CUDA GPU (`--features cuda`, see
//! [`crate::cuda`]). Every front takes `--device cpu|cuda` and calls [`Device::check`] first, so a
//! machine without a GPU gets one line saying why, never a panic.

use crate::Result;

/// A compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The CPU reference path.
    #[default]
    Cpu,
    /// The CUDA path: decode attention and Attention Matching's n×T products on the GPU.
    Cuda,
}

impl Device {
    /// The device's name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }

    /// Ok when the device can run here: the CPU always; CUDA when this build has the feature and
    /// the driver, NVRTC, cuBLAS and a GPU are found (the first use compiles the kernels).
    pub fn check(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda => cuda_check(),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_check() -> Result<()> {
    crate::cuda::gpu().map(|_| ())
}

#[cfg(not(feature = "cuda"))]
fn cuda_check() -> Result<()> {
    Err(crate::Error::Device("--device cuda: this kvcompact was built without CUDA support (rebuild with `cargo build --release --features cuda`)".into()))
}
