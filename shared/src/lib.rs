//! The export cache's library: domain, ports, AWS adapters, encoders and the use cases the three
//! functions run.

pub mod adapters;
pub mod config;
pub mod domain;
pub mod encode;
pub mod ports;
pub mod services;
pub mod telemetry;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
