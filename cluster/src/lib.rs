//! rvol's control plane: the cluster store ([`store`]), a small trait over
//! a replicated key-value store, and its etcd backend ([`etcd`]); the
//! records kept in it ([`model`]) and one read of them ([`view`]);
//! leadership among controllers ([`leader`]); where replicas go
//! ([`placement`]); the controller ([`controller`]) and the node agent
//! ([`agent`]); the HTTP client they share ([`http`]) and their metrics
//! ([`metrics`]).

pub mod agent;
pub mod client;
pub mod controller;
pub mod etcd;
pub mod http;
pub mod keys;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod placement;
pub mod store;
pub mod view;
