//! The pod's interface inside its network namespace, after CNI: what the guest copies from it
//! (MAC, MTU, addresses, routes), and the tap that joins it to the VM. The tap and the CNI
//! interface are bridged the way Kata Containers' "tcfilter" model does it: an ingress qdisc on
//! each, and a u32 match-all filter whose mirred action redirects every frame to the other's
//! egress. The namespace's own IP stack never sees the pod's traffic; the guest owns the
//! interface's MAC and addresses, so the CNI bridge (or whatever is on the other end) sees the
//! same endpoint it set up. All of it through rtnetlink, on a thread inside the namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::path::Path;

use crx_virtio::devices::tap::Tap;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

use super::netns;

/// The tap's name inside the pod's namespace.
pub const TAP_NAME: &str = "tap0";
/// `tc ... parent ffff:`: the ingress qdisc.
const INGRESS_PARENT: u32 = 0xffff_0000;

/// Why the interface could not be read or the tap joined to it.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot enter the pod network namespace: {0}")]
    Netns(#[source] std::io::Error),
    #[error("no interface {0} in the pod network namespace (did the CNI plugins make it?)")]
    NoInterface(String),
    #[error("interface {0} has no Ethernet address")]
    NoMac(String),
    #[error("cannot create the tap: {0}")]
    Tap(#[from] crx_virtio::devices::tap::TapError),
    #[error("netlink, {what}: {source}")]
    Netlink {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("netlink connection: {0}")]
    Connection(#[source] std::io::Error),
}

/// What the guest's interface gets: the CNI interface's identity and routing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInterface {
    /// `xx:xx:xx:xx:xx:xx`
    pub mac: String,
    pub mtu: u32,
    /// CIDRs, e.g. `10.88.0.5/16`.
    pub addresses: Vec<String>,
    /// In the order they can be added: routes without a gateway first.
    pub routes: Vec<GuestRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRoute {
    /// A CIDR, or `default`.
    pub destination: String,
    /// Empty for a directly connected destination.
    pub gateway: String,
}

/// Reads interface `ifname` in the namespace at `netns`, creates the tap beside it and joins the
/// two with tc redirects. Returns the tap's descriptor (the tap lives as long as it is open)
/// and what the guest needs.
pub fn attach(netns: &Path, ifname: &str) -> Result<(OwnedFd, GuestInterface), LinkError> {
    let ifname = ifname.to_owned();
    netns::run_in(netns, move || {
        let tap = Tap::open(TAP_NAME)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(LinkError::Connection)?;
        let guest = runtime.block_on(async {
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(LinkError::Connection)?;
            tokio::spawn(connection);
            join(&handle, &ifname).await
        })?;
        Ok((OwnedFd::from(tap), guest))
    })
    .map_err(LinkError::Netns)?
}

async fn join(handle: &Handle, ifname: &str) -> Result<GuestInterface, LinkError> {
    let link = link_by_name(handle, ifname).await?;
    let index = link.header.index;
    let mac = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) if mac.len() == 6 => Some(format_mac(mac)),
            _ => None,
        })
        .ok_or_else(|| LinkError::NoMac(ifname.to_owned()))?;
    let mtu = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
        .unwrap_or(1500);
    let guest = GuestInterface {
        mac,
        mtu,
        addresses: addresses(handle, index).await?,
        routes: routes(handle, index).await?,
    };

    let tap = link_by_name(handle, TAP_NAME).await?.header.index;
    let netlink = |what| move |source| LinkError::Netlink { what, source };
    handle
        .link()
        .set(LinkUnspec::new_with_index(tap).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(netlink("tap up"))?;
    for (from, to) in [(index, tap), (tap, index)] {
        handle
            .qdisc()
            .add(from as i32)
            .ingress()
            .execute()
            .await
            .map_err(netlink("ingress qdisc"))?;
        handle
            .traffic_filter(from as i32)
            .add()
            .parent(INGRESS_PARENT)
            // Filter protocols are in network byte order: "all" is htons(ETH_P_ALL).
            .protocol((libc::ETH_P_ALL as u16).to_be())
            .redirect(to)
            .map_err(netlink("redirect filter"))?
            .execute()
            .await
            .map_err(netlink("redirect filter"))?;
    }
    tracing::debug!(ifname, tap = TAP_NAME, ?guest, "tap joined by tc redirect");
    Ok(guest)
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<LinkMessage, LinkError> {
    match handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(Some(link)) => Ok(link),
        Ok(None) => Err(LinkError::NoInterface(name.to_owned())),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            Err(LinkError::NoInterface(name.to_owned()))
        }
        Err(source) => Err(LinkError::Netlink {
            what: "get link",
            source,
        }),
    }
}

/// The interface's global addresses (the guest makes its own link-local ones).
async fn addresses(handle: &Handle, index: u32) -> Result<Vec<String>, LinkError> {
    let messages: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|source| LinkError::Netlink {
            what: "get addresses",
            source,
        })?;
    Ok(messages
        .iter()
        .filter(|m| m.header.scope == AddressScope::Universe)
        .filter_map(|m| {
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            local
                .or(address)
                .map(|ip| format!("{ip}/{}", m.header.prefix_len))
        })
        .collect())
}

/// The main table's routes out of the interface that CNI (not the kernel, for an address)
/// installed, gateway-less ones first so that the routes through a gateway find it.
async fn routes(handle: &Handle, index: u32) -> Result<Vec<GuestRoute>, LinkError> {
    let mut all: Vec<RouteMessage> = Vec::new();
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let family = query.header.address_family;
        let found: Vec<RouteMessage> = handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(|source| LinkError::Netlink {
                what: "get routes",
                source,
            })?;
        // A kernel without the family dumps every family's routes instead.
        all.extend(
            found
                .into_iter()
                .filter(|r| r.header.address_family == family),
        );
    }
    let mut routes: Vec<GuestRoute> = all
        .iter()
        .filter(|r| {
            r.header.table == RouteHeader::RT_TABLE_MAIN
                && r.header.kind == RouteType::Unicast
                && !matches!(r.header.protocol, RouteProtocol::Kernel | RouteProtocol::Ra)
                && r.attributes.contains(&RouteAttribute::Oif(index))
        })
        .map(|r| {
            let ip = |want: fn(&RouteAttribute) -> Option<&RouteAddress>| {
                r.attributes.iter().find_map(want).and_then(|a| match a {
                    RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
                    RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
                    _ => None,
                })
            };
            let destination = match ip(|a| match a {
                RouteAttribute::Destination(d) => Some(d),
                _ => None,
            }) {
                Some(dst) if r.header.destination_prefix_length > 0 => {
                    format!("{dst}/{}", r.header.destination_prefix_length)
                }
                _ => "default".to_owned(),
            };
            let gateway = ip(|a| match a {
                RouteAttribute::Gateway(g) => Some(g),
                _ => None,
            })
            .map(|g| g.to_string())
            .unwrap_or_default();
            GuestRoute {
                destination,
                gateway,
            }
        })
        .collect();
    routes.sort_by_key(|r| !r.gateway.is_empty());
    Ok(routes)
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_written_as_ip_writes_them() {
        assert_eq!(
            format_mac(&[0x0a, 0x58, 0x0a, 0xf4, 0, 0x1f]),
            "0a:58:0a:f4:00:1f"
        );
    }
}
