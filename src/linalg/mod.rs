//! Linear algebra for Attention Matching (spec §5, §6), on top of faer.
//!
//! Two levels, as in faer itself (style §1 lesson 8):
//! - low level: free functions with explicit [`faer::Par`] and caller-provided scratch
//!   ([`lstsq::qr_lstsq_in_place`], [`dense`] kernels), no hidden allocation;
//! - high level: [`lstsq::lstsq`], [`nnls::nnls_pg`], [`nnls::nnls_active_set`], which allocate and
//!   report what they did ([`lstsq::LstsqMethod`], fallbacks, condition estimates).
//!
//! Everything here is f64: the systems are small (t columns, t ≤ a few hundred) and the Gram form
//! squares the condition number (spec §5.4.5). The big f32 GEMMs live in `compact`.
//!
//! [`expf`] holds the vectorised `exp` used to build the n×T exponential matrix, with its naive twin.

pub mod dense;
pub mod expf;
pub mod lstsq;
pub mod nnls;

pub use lstsq::{lstsq, Guard, Lstsq, LstsqMethod};
pub use nnls::{nnls_active_set, nnls_active_set_gram, nnls_pg, nnls_pg_gram, ActiveSet, PgFit};

/// Column-major f64 matrix, the working type of this module.
pub type MatF = faer::Mat<f64>;
