//! What `weft run` changed on the host, owned by one guard that undoes it on every exit path.
//!
//! [`Installed`] is made right after the TUN device exists and is told when the masquerade
//! table is in place. The clean path ends with [`Installed::remove`] (the link deleted through
//! netlink, the table deleted). Any other end (an error returned with `?` while the daemon
//! still sets up, a panic that unwinds through it) drops the guard instead: the TUN device is
//! not persistent, so it goes with its last descriptor (and takes its addresses and routes with
//! it), and the drop deletes the nftables table itself.

use tracing::{error, info, warn};

use crate::host::netlink::Netlink;

/// The TUN device (by name) and whether the masquerade table exists.
#[derive(Debug)]
pub struct Installed {
    netlink: Netlink,
    interface: String,
    masquerade: bool,
    removed: bool,
}

impl Installed {
    /// The guard of TUN device `interface`, just created.
    pub fn new(netlink: Netlink, interface: String) -> Self {
        Self {
            netlink,
            interface,
            masquerade: false,
            removed: false,
        }
    }

    /// Records that the masquerade table (`inet weft`) may now exist.
    pub fn masquerading(&mut self) {
        self.masquerade = true;
    }

    /// Undoes everything, on the clean path: deletes the link if it is still there (its routes
    /// go with it) and the masquerade table.
    pub async fn remove(mut self) {
        self.removed = true;
        match self.netlink.link(&self.interface).await {
            Ok(Some((index, _))) => match self.netlink.delete_link(index).await {
                Ok(()) => info!(interface = %self.interface, "deleted"),
                Err(e) => error!(interface = %self.interface, error = %e, "could not delete"),
            },
            Ok(None) => {}
            Err(e) => error!(interface = %self.interface, error = %e, "could not look up"),
        }
        self.remove_table();
    }

    fn remove_table(&self) {
        if !self.masquerade {
            return;
        }
        match crate::host::masquerade::remove() {
            Ok(()) => info!(
                table = crate::host::masquerade::TABLE,
                "removed the nftables table"
            ),
            Err(e) => error!(error = %e, "could not remove the nftables table"),
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        warn!(
            interface = %self.interface,
            "weft run ended before its clean shutdown: removing what it installed"
        );
        self.remove_table();
    }
}
