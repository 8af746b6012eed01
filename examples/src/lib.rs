//! Shared parts of the example programs (the programs themselves live in `src/bin/`): the
//! critical-heap hash table of `kvstate` and `kv` ([`table`]), the line protocol that `kv` and
//! `kvclient` speak ([`kvproto`]), and running as a watchd service or standalone ([`service`]).

pub mod kvproto;
pub mod service;
pub mod table;
