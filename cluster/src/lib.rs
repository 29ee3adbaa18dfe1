//! rvol's control plane. So far: the cluster store ([`store`]), a small
//! trait over a replicated key-value store, and its etcd backend
//! ([`etcd`]). The controller and the agents build on it.

pub mod etcd;
pub mod store;
