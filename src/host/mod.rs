//! What touches the host: links, addresses and routes ([`netlink`]), the masquerade table
//! ([`masquerade`]), key and secret files ([`keys`]), atomic writes ([`files`]), systemd
//! notification ([`notify`]), and the guard that undoes what `weft run` installed
//! ([`installed`]).

pub mod files;
pub mod installed;
pub mod keys;
pub mod masquerade;
pub mod netlink;
pub mod notify;
