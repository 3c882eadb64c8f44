//! The VM configuration model, moved to `api_server::config` so the API can share it; re-exported here.
pub use api_server::config::*;
