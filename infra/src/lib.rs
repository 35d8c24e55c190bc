//! The local stack: provisioning from template.yaml, deterministic seed data, the bridge that plays
//! the SQS trigger and the schedule (with the worker's own supervised `cargo lambda watch`), and the
//! demo client.

pub mod bridge;
pub mod demo;
pub mod filecheck;
pub mod provision;
pub mod seed;
pub mod streams;
pub mod supervise;
pub mod template;
pub mod token;
