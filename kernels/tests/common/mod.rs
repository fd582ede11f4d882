//! Running a check at every dispatch level the CPU has.

use std::sync::{Mutex, MutexGuard, Once};

use kvcompact_kernels::{detected_simd_level, force_simd_level, SimdLevel};

/// The dispatch level is process-wide: every test of a binary that forces it holds this lock,
/// so no test sees the level change between two calls it compares.
static LEVEL_LOCK: Mutex<()> = Mutex::new(());

/// Holds the lock; puts the default level back when dropped (also when a check panics).
struct Restore<'a>(#[allow(dead_code)] MutexGuard<'a, ()>);
impl Drop for Restore<'_> {
    fn drop(&mut self) {
        force_simd_level(None).expect("the default level is always supported");
    }
}

/// Runs `f` once per level in `Scalar, V3, V4` that this CPU supports, with the kernels forced
/// to that level; the levels it lacks are skipped with a note (printed once per process).
/// Stops at the first error, which names the level.
pub fn each_level<E: std::fmt::Display>(mut f: impl FnMut(SimdLevel) -> Result<(), E>) -> Result<(), String> {
    static NOTE: Once = Once::new();
    let _restore = Restore(LEVEL_LOCK.lock().unwrap_or_else(|e| e.into_inner()));
    for level in SimdLevel::ALL {
        if force_simd_level(Some(level)).is_err() {
            NOTE.call_once(|| eprintln!("note: skipping SIMD level {level}: this CPU supports up to {}", detected_simd_level()));
            continue;
        }
        f(level).map_err(|e| format!("at SIMD level {level}: {e}"))?;
    }
    Ok(())
}
