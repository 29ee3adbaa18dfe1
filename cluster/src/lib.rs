//! rvol's control plane. So far: the cluster store ([`store`]), a small
//! trait over a replicated key-value store, its etcd backend ([`etcd`]),
//! leadership among several controllers ([`leader`]), the records kept in
//! the store ([`model`]), an agent's registration of its node ([`agent`])
//! and where a volume's replicas go ([`placement`]). The controller and
//! the agents' work build on them.

pub mod agent;
pub mod etcd;
pub mod leader;
pub mod model;
pub mod placement;
pub mod store;
