//! Bulkhead's HTTP service: the configuration it runs with, the agent API
//! and probes it serves, and its start and graceful stop.

pub mod app;
mod cluster;
pub mod config;
mod data_lock;
pub mod door;
pub mod error;
mod extract;
pub mod observability;
pub mod openapi;
mod routes;
pub mod sandbox;
mod serve;

pub use app::{App, AppState};
pub use bulkhead_agent::now_ms;
pub use config::{Config, ConfigError, Environment};
pub use routes::timestamp;
pub use serve::{Server, shutdown_signal, termination_signal};
