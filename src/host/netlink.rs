//! The host side of the TUN device, over rtnetlink: MTU, overlay address, link state, routes;
//! and the underlay MTU that sets the default overlay MTU.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::warn;

/// A netlink request that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct NetlinkError {
    what: String,
    #[source]
    source: rtnetlink::Error,
}

fn err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError { what, source }
}

/// A connection to the kernel's routing netlink in the current network namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the connection. The returned future is its reader: the caller runs it (spawns
    /// it) for as long as the handle is used.
    pub fn connect() -> std::io::Result<(Self, impl Future<Output = ()> + Send + 'static)> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        Ok((Self { handle }, conn))
    }

    /// The index and MTU of the link called `name`, if there is one.
    pub async fn link(&self, name: &str) -> Result<Option<(u32, u32)>, NetlinkError> {
        let mut links = self
            .handle
            .clone()
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => {
                let mtu = msg.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                });
                Ok(Some((msg.header.index, mtu.unwrap_or(0))))
            }
            Ok(None) => Ok(None),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
            Err(e) => Err(err(format!("looking up link {name}"))(e)),
        }
    }

    /// Every address on every link of this namespace.
    pub async fn local_addresses(&self) -> Result<Vec<IpAddr>, NetlinkError> {
        let mut addrs = self.handle.address().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(err("listing addresses".to_owned()))?
        {
            out.extend(msg.attributes.iter().filter_map(|a| match a {
                AddressAttribute::Address(a) | AddressAttribute::Local(a) => Some(*a),
                _ => None,
            }));
        }
        Ok(out)
    }

    /// The MTU of the link that carries `addr`, if any link does.
    pub async fn mtu_of_address(&self, addr: IpAddr) -> Result<Option<u32>, NetlinkError> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_address_filter(addr)
            .execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(err(format!("looking up address {addr}")))?
        {
            let has = msg.attributes.iter().any(|a| {
                matches!(a, AddressAttribute::Address(a) | AddressAttribute::Local(a) if *a == addr)
            });
            if has {
                let mut links = self
                    .handle
                    .clone()
                    .link()
                    .get()
                    .match_index(msg.header.index)
                    .execute();
                if let Some(link) = links.try_next().await.map_err(err("looking up link"))? {
                    return Ok(link.attributes.iter().find_map(|a| match a {
                        LinkAttribute::Mtu(m) => Some(*m),
                        _ => None,
                    }));
                }
            }
        }
        Ok(None)
    }

    /// Gives link `index` its MTU and addresses, brings it up, and routes `routes` into it.
    pub async fn configure(
        &self,
        name: &str,
        index: u32,
        mtu: u16,
        addresses: &[IpNet],
        routes: &[IpNet],
    ) -> Result<(), NetlinkError> {
        self.set_mtu(name, index, mtu).await?;
        for a in addresses {
            self.handle
                .address()
                .add(index, a.addr(), a.prefix_len())
                .execute()
                .await
                .map_err(err(format!("adding address {a} to {name}")))?;
        }
        let up = LinkUnspec::new_with_index(index).up();
        self.set_link(up, format!("bringing {name} up")).await?;
        for r in routes {
            self.add_route(name, index, *r).await?;
        }
        Ok(())
    }

    fn route_message(
        r: IpNet,
        index: u32,
    ) -> Result<rtnetlink::packet_route::route::RouteMessage, NetlinkError> {
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(r.network(), r.prefix_len())
            .map_err(|e| NetlinkError {
                what: format!("route {r}"),
                source: rtnetlink::Error::InvalidNla(e.to_string()),
            })?
            .output_interface(index)
            .build())
    }

    /// Routes `r` into link `index` (called `name`).
    pub async fn add_route(&self, name: &str, index: u32, r: IpNet) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .add(Self::route_message(r, index)?)
            .execute()
            .await
            .map_err(err(format!("adding route {r} dev {name}")))
    }

    /// Removes the route of `r` into link `index` (called `name`).
    pub async fn delete_route(&self, name: &str, index: u32, r: IpNet) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .del(Self::route_message(r, index)?)
            .execute()
            .await
            .map_err(err(format!("removing route {r} dev {name}")))
    }

    /// Sets link `index`'s MTU.
    pub async fn set_mtu(&self, name: &str, index: u32, mtu: u16) -> Result<(), NetlinkError> {
        let set = LinkUnspec::new_with_index(index).mtu(u32::from(mtu));
        self.set_link(set, format!("setting MTU {mtu} on {name}"))
            .await
    }

    /// Caps how many segments one GSO packet the kernel hands link `index` (called `name`) may
    /// carry: the host's own TCP sizes its segments to the cap, and a larger packet forwarded
    /// to the link is cut into single packets first. Read back: a kernel that takes the
    /// attribute without applying it is an error too.
    pub async fn cap_gso_segments(
        &self,
        name: &str,
        index: u32,
        segments: u32,
    ) -> Result<(), NetlinkError> {
        let what = format!("capping GSO packets on {name} at {segments} segments");
        let set = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::GsoMaxSegs(segments));
        self.set_link(set, what.clone()).await?;
        let mut links = self
            .handle
            .clone()
            .link()
            .get()
            .match_index(index)
            .execute();
        let kept = match links.try_next().await {
            Ok(msg) => msg.and_then(|m| {
                m.attributes.iter().find_map(|a| match a {
                    LinkAttribute::GsoMaxSegs(n) => Some(*n),
                    _ => None,
                })
            }),
            Err(e) => return Err(err(what)(e)),
        };
        if kept == Some(segments) {
            return Ok(());
        }
        Err(NetlinkError {
            what,
            source: rtnetlink::Error::InvalidNla(format!(
                "the link kept gso_max_segs {}",
                kept.map_or_else(|| "unreported".to_owned(), |n| n.to_string())
            )),
        })
    }

    /// Applies one change to a link; `what` names it in the error.
    async fn set_link(
        &self,
        set: rtnetlink::LinkMessageBuilder<LinkUnspec>,
        what: String,
    ) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(set.build())
            .execute()
            .await
            .map_err(err(what))
    }

    /// Removes addresses `old` from link `index` and adds `new`.
    pub async fn swap_addresses(
        &self,
        index: u32,
        old: &[IpNet],
        new: &[IpNet],
    ) -> Result<(), NetlinkError> {
        for a in new {
            self.handle
                .address()
                .add(index, a.addr(), a.prefix_len())
                .execute()
                .await
                .map_err(err(format!("adding address {a}")))?;
        }
        if old.is_empty() {
            return Ok(());
        }
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = addrs.try_next().await.map_err(err("listing addresses"))? {
            let matches = msg.attributes.iter().any(|attr| {
                matches!(attr, AddressAttribute::Address(a) if old.iter().any(|o| o.addr() == *a && o.prefix_len() == msg.header.prefix_len))
            });
            if matches {
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(err("removing an old address"))?;
            }
        }
        Ok(())
    }

    /// Deletes link `index` (its addresses and routes go with it).
    pub async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        self.handle
            .clone()
            .link()
            .del(index)
            .execute()
            .await
            .map_err(err("deleting link"))
    }
}

/// Overlay MTU when the underlay's cannot be found.
pub const FALLBACK_MTU: u16 = 1420;

/// The overlay MTU: the configured one, else the underlay's (the link of `private`, the node's
/// effective private address: the config's, or its Node's) minus WireGuard's overhead, else
/// 1420.
pub async fn choose_mtu(
    config: &weft_config::Config,
    nl: &Netlink,
    private: Option<IpAddr>,
) -> anyhow::Result<u16> {
    if let Some(mtu) = config.network.mtu {
        return Ok(mtu);
    }
    let Some(addr) = private else {
        return Ok(FALLBACK_MTU);
    };
    Ok(match underlay_mtu(nl, addr).await? {
        Some(m) => m,
        None => {
            warn!(%addr, "the private address is on no local link; using MTU {FALLBACK_MTU}");
            FALLBACK_MTU
        }
    })
}

/// The overlay MTU the link carrying `addr` allows (its MTU minus WireGuard's overhead, at
/// least 1280), if a local link carries it.
pub async fn underlay_mtu(nl: &Netlink, addr: IpAddr) -> anyhow::Result<Option<u16>> {
    let overhead = if addr.is_ipv4() { 60 } else { 80 };
    Ok(nl.mtu_of_address(addr).await?.map(|m| {
        u16::try_from(m.saturating_sub(overhead))
            .unwrap_or(FALLBACK_MTU)
            .max(1280)
    }))
}
