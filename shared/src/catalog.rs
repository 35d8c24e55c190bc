//! The catalog's types live in the domain (`domain::catalog`); this path stays for callers that
//! name them here.

pub use crate::domain::catalog::*;
