//! A spinning team for one decode step: the pool's threads stay awake between the stages of
//! one token, so a stage costs a cache-line handoff instead of a rayon park/wake.
//!
//! One decode token runs about five small parallel stages per layer (q/k/v, attention, o,
//! gate/up, down), each a few hundred microseconds at most. As separate rayon fork/joins each
//! one wakes a parked worker through a futex; measured on a 2-vCPU VM that cost ≈ 10% of
//! 2-thread decode. [`team_scope`] instead takes the other workers once per token; they spin
//! (then yield) waiting for [`Team::for_each_mut`] to publish a stage.
//!
//! Work is claimed, not assigned: a stage is `n` items and any thread of the team, the caller
//! included, claims the next index with one compare-and-swap. A worker that never arrives (busy
//! elsewhere in the pool) costs nothing but its share of the work, and the caller can always
//! finish a stage alone, so nothing waits on a thread that is not working. Which thread runs an
//! item never changes what the item computes, so results depend only on how the caller cuts
//! the work, never on the thread count.

use std::any::Any;
use std::hint::spin_loop;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Spins (`pause`) before a waiting thread starts yielding its core between checks.
const SPINS_BEFORE_YIELD: u32 = 4096;

// The claim word: epoch (24 bits) | item count (20 bits) | next index (20 bits). The epoch
// changes with every stage, so a stale compare-and-swap from a thread that slept through a
// whole stage can never claim an item of the next one.
const IDX_BITS: u32 = 20;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
/// Most items one stage can hold.
const MAX_ITEMS: usize = IDX_MASK as usize;

fn pack(epoch: u64, n: usize, idx: usize) -> u64 {
    (epoch << (2 * IDX_BITS)) | ((n as u64) << IDX_BITS) | idx as u64
}
fn count(w: u64) -> usize {
    ((w >> IDX_BITS) & IDX_MASK) as usize
}
fn index(w: u64) -> usize {
    (w & IDX_MASK) as usize
}

/// A type-erased stage body, `&(dyn Fn(usize) + Sync)` behind a thin pointer.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

/// State shared by the caller and the helpers of one [`team_scope`].
struct Shared {
    claim: AtomicU64,
    done: AtomicUsize,
    // Points at the caller's `Job` of the current stage; valid while that stage has unfinished
    // items (the caller does not return from `for_each_mut` before `done` reaches the count).
    job: AtomicPtr<()>,
    stop: AtomicBool,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Shared {
    /// Claim the next item of the current stage; None once every item is taken.
    fn claim(&self) -> Option<usize> {
        let mut w = self.claim.load(Ordering::Acquire);
        loop {
            if index(w) >= count(w) {
                return None;
            }
            match self.claim.compare_exchange_weak(w, w + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(index(w)),
                Err(now) => w = now,
            }
        }
    }

    /// Run item `i` of the current stage (claimed by this thread) and count it done.
    fn run(&self, i: usize) {
        // SAFETY: the successful claim of `i` read the claim word published (Release) after
        // `job` was stored, and the stage cannot end before `done` counts this item, so the
        // pointer and the caller's `Job` it points to are alive.
        let job: Job<'_> = unsafe { *(self.job.load(Ordering::Relaxed) as *const Job<'_>) };
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| job(i))) {
            self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
        }
        self.done.fetch_add(1, Ordering::Release);
    }

    /// A helper's life: run whatever items appear until the scope ends.
    fn help(&self) {
        let mut idle = 0u32;
        loop {
            if let Some(i) = self.claim() {
                self.run(i);
                idle = 0;
                continue;
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            idle = idle.saturating_add(1);
            if idle < SPINS_BEFORE_YIELD {
                spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// The threads of one [`team_scope`]; see the module docs.
pub struct Team<'s> {
    shared: Option<&'s Shared>,
    size: usize,
    epoch: std::cell::Cell<u64>,
}

impl Team<'_> {
    /// A team of the calling thread alone: [`Team::for_each_mut`] is a plain loop.
    pub fn solo() -> Team<'static> {
        Team { shared: None, size: 1, epoch: std::cell::Cell::new(0) }
    }

    /// Threads that may work on a stage (the caller included); cut work by this for balance,
    /// never for results.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Call `f(i, &mut items[i])` for every item, on any threads of the team, and return when
    /// all are done. A panic in `f` is re-raised here once the stage has finished.
    pub fn for_each_mut<T: Send>(&self, items: &mut [T], f: impl Fn(usize, &mut T) + Sync) {
        let n = items.len();
        let Some(sh) = self.shared.filter(|_| n > 1 && n <= MAX_ITEMS) else {
            for (i, it) in items.iter_mut().enumerate() {
                f(i, it);
            }
            return;
        };
        let base = SendPtr(items.as_mut_ptr());
        let body = move |i: usize| {
            let p = &base;
            // SAFETY: each index is claimed exactly once per stage, so no two threads hold the
            // same item, and `items` outlives the stage (this call waits for `done`).
            let it = unsafe { &mut *p.0.add(i) };
            f(i, it)
        };
        let job: Job<'_> = &body;
        sh.job.store(&job as *const Job<'_> as *mut (), Ordering::Relaxed);
        sh.done.store(0, Ordering::Relaxed);
        let epoch = self.epoch.get().wrapping_add(1) & ((1 << 24) - 1);
        self.epoch.set(epoch);
        sh.claim.store(pack(epoch, n, 0), Ordering::Release);
        while let Some(i) = sh.claim() {
            sh.run(i);
        }
        let mut spins = 0u32;
        while sh.done.load(Ordering::Acquire) < n {
            spins = spins.saturating_add(1);
            if spins < SPINS_BEFORE_YIELD {
                spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Some(p) = sh.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            resume_unwind(p);
        }
    }
}

struct SendPtr<T>(*mut T);
// SAFETY: the pointer is only dereferenced for distinct claimed items of a `T: Send` slice.
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// Run `op` with a [`Team`] of every thread of the current rayon pool, awake for the whole call.
///
/// `op` itself runs on a pool thread (the caller's own when it is one), so rayon calls made
/// inside it still make progress while the other workers are helping; they run on that thread
/// alone. With one thread in the pool the team is [`Team::solo`].
pub fn team_scope<R: Send>(op: impl FnOnce(&Team<'_>) -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads <= 1 {
        return op(&Team::solo());
    }
    let shared = Shared {
        claim: AtomicU64::new(0),
        done: AtomicUsize::new(0),
        job: AtomicPtr::new(std::ptr::null_mut()),
        stop: AtomicBool::new(false),
        panic: Mutex::new(None),
    };
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| shared.help());
        }
        let team = Team { shared: Some(&shared), size: threads, epoch: std::cell::Cell::new(0) };
        let r = catch_unwind(AssertUnwindSafe(|| op(&team)));
        shared.stop.store(true, Ordering::Release);
        match r {
            Ok(r) => r,
            Err(p) => resume_unwind(p),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()
    }

    #[test]
    fn every_item_runs_once_per_stage_at_any_thread_count() {
        for threads in [1, 2, 3, 4] {
            let sums = pool(threads).install(|| {
                team_scope(|team| {
                    let mut v = vec![0u64; 37];
                    for stage in 0..500u64 {
                        let n = 1 + (stage as usize * 7) % 37;
                        team.for_each_mut(&mut v[..n], |i, x| *x += i as u64 + stage);
                    }
                    v
                })
            });
            let mut want = vec![0u64; 37];
            for stage in 0..500u64 {
                let n = 1 + (stage as usize * 7) % 37;
                for (i, x) in want[..n].iter_mut().enumerate() {
                    *x += i as u64 + stage;
                }
            }
            assert_eq!(sums, want, "{threads} threads");
        }
    }

    #[test]
    fn a_panicking_item_is_raised_in_the_caller_and_the_scope_ends() {
        let r = pool(2).install(|| {
            catch_unwind(AssertUnwindSafe(|| {
                team_scope(|team| {
                    let mut v = vec![0u32; 16];
                    team.for_each_mut(&mut v, |i, _| assert!(i != 11, "item 11"));
                })
            }))
        });
        assert!(r.is_err());
    }

    #[test]
    fn rayon_work_inside_a_scope_called_from_outside_the_pool_does_not_deadlock() {
        // The global pool, entered from a non-pool thread: op runs on a worker, helpers occupy
        // the others, and a parallel iterator inside op still completes.
        let total: u64 = std::thread::spawn(|| {
            team_scope(|team| {
                use rayon::prelude::*;
                let mut v = vec![1u64; 8];
                team.for_each_mut(&mut v, |i, x| *x += i as u64);
                v.par_iter().sum::<u64>() + (0..1000u64).into_par_iter().sum::<u64>()
            })
        })
        .join()
        .unwrap();
        assert_eq!(total, 8 + 28 + 499_500);
    }
}
