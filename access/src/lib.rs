//! Who may call rvol's HTTP APIs (an engine's admin API, the cluster
//! controller's): bearer tokens that either read or control
//! ([`tokens`]), served over HTTPS on TCP ([`https`]).

pub mod https;
pub mod tokens;

pub use tokens::{guard, read_token, Role, Tokens};
