//! rvol's control plane. So far: the cluster store ([`store`]), a small
//! trait over a replicated key-value store, its etcd backend ([`etcd`]),
//! and leadership among several controllers ([`leader`]). The controller
//! and the agents build on them.

pub mod etcd;
pub mod leader;
pub mod store;
