//! Pod networking, as a CRI runtime does it for RunPodSandbox: a named network namespace per
//! pod (`<netns dir>/crx-<sandbox id>`, `/run/netns` by default, the path CNI plugins get as
//! `CNI_NETNS`), CNI ADD of a network configuration list from a configuration directory with
//! the standard plugins, then a tap beside the CNI interface joined to it by tc redirect (see
//! [`link`]). The VMM gets the tap's descriptor and the interface's MAC; the guest agent gets
//! its addresses, routes and the network's DNS ([`NetworkState::apply_to`]).
//!
//! Everything needed to undo it is in [`NetworkState`], kept in the sandbox's state:
//! [`teardown`] runs CNI DEL with the cached ADD result and removes the namespace, and may be
//! repeated — a VMM that died, a namespace already gone, an address already released are all
//! fine. The tap needs no teardown: it lives as long as the VMM holds it.
//!
//! A namespace made and configured by someone else (containerd's CRI, whose pods run through
//! `containerd-shim-crx-v2`) is joined instead ([`join`]): the tap beside its interface, the
//! same guest configuration, nothing to tear down.

pub mod cni;
pub mod link;
pub mod netns;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crx_agent_proto::{ConfigureSandbox, Dns, Interface, Route};
use rscni_types::types::{CNIResultWithVersion, NetConfList};
use serde::{Deserialize, Serialize};

pub use cni::CniError;
pub use link::{GuestInterface, GuestRoute, LinkError};

/// Where CNI network configurations are read from unless configured otherwise.
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
/// Where CNI plugins are looked for unless configured otherwise: Debian's
/// `containernetworking-plugins`, then the upstream convention.
pub const DEFAULT_BIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];
/// Where pod network namespaces are made unless configured otherwise (as `ip netns` does).
pub const DEFAULT_NETNS_DIR: &str = "/run/netns";
/// The interface CNI creates in the namespace.
pub const DEFAULT_IFNAME: &str = "eth0";
/// The guest's interface: the VM's one virtio-net device.
pub const GUEST_IFNAME: &str = "eth0";

/// Why a pod network could not be set up or torn down.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cni(#[from] CniError),
    #[error("pod interface: {0}")]
    Link(#[from] LinkError),
}

/// Which network a pod joins and where the pieces are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub conf_dir: PathBuf,
    /// Which configuration list, by its `name`; `None`: the first file in name order.
    pub network: Option<String>,
    pub bin_dirs: Vec<PathBuf>,
    pub netns_dir: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, … for a CRI pod).
    pub args: Vec<(String, String)>,
}

impl Default for NetworkConfig {
    fn default() -> NetworkConfig {
        NetworkConfig {
            conf_dir: DEFAULT_CONF_DIR.into(),
            network: None,
            bin_dirs: DEFAULT_BIN_DIRS.iter().map(PathBuf::from).collect(),
            netns_dir: DEFAULT_NETNS_DIR.into(),
            ifname: DEFAULT_IFNAME.into(),
            args: Vec::new(),
        }
    }
}

/// Where a pod VM's network interface comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetwork {
    /// A namespace of the sandbox's own, CNI ADD in it ([`setup`]).
    Cni(NetworkConfig),
    /// An interface in a namespace someone else made ([`join`]).
    Join { netns: PathBuf, ifname: String },
}

/// A pod's network as set up: all that [`teardown`] needs and what the guest gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkState {
    pub netns: PathBuf,
    pub container_id: String,
    pub ifname: String,
    pub args: Vec<(String, String)>,
    pub bin_dirs: Vec<PathBuf>,
    /// The configuration list ADD ran with (DEL runs with the same, whatever the directory
    /// holds by then); `None`: the namespace and its interface were made by someone else (see
    /// [`join`]), who also tears them down.
    pub list: Option<NetConfList>,
    /// The chain's ADD result, as the last plugin printed it.
    pub result: serde_json::Value,
    pub guest: GuestInterface,
}

impl NetworkState {
    fn attachment(&self) -> cni::Attachment<'_> {
        cni::Attachment {
            container_id: &self.container_id,
            netns: &self.netns,
            ifname: &self.ifname,
            args: &self.args,
            bin_dirs: &self.bin_dirs,
        }
    }

    /// The ADD result, once ADD has succeeded.
    fn cached_result(&self) -> Option<&serde_json::Value> {
        (!self.result.is_null()).then_some(&self.result)
    }

    /// The DNS settings of the CNI result, if it has any.
    pub fn dns(&self) -> Option<Dns> {
        let result: CNIResultWithVersion = serde_json::from_value(self.result.clone()).ok()?;
        let dns = result.into_result().dns?;
        let mut searches = dns.search.unwrap_or_default();
        if searches.is_empty() {
            searches.extend(dns.domain);
        }
        let dns = Dns {
            servers: dns.nameservers,
            searches,
            options: dns.options.unwrap_or_default(),
        };
        (dns != Dns::default()).then_some(dns)
    }

    /// Adds the guest's interface, its routes and (unless the request has its own) the
    /// network's DNS to a ConfigureSandbox request.
    pub fn apply_to(&self, request: &mut ConfigureSandbox) {
        request.interfaces.push(Interface {
            name: GUEST_IFNAME.into(),
            mac: self.guest.mac.clone(),
            addresses: self.guest.addresses.clone(),
            mtu: self.guest.mtu,
        });
        request
            .routes
            .extend(self.guest.routes.iter().map(|r| Route {
                destination: r.destination.clone(),
                gateway: r.gateway.clone(),
                device: GUEST_IFNAME.into(),
            }));
        if request.dns.is_none() {
            request.dns = self.dns();
        }
    }
}

/// The namespace name of sandbox `id`.
pub fn netns_name(id: &str) -> String {
    format!("crx-{id}")
}

/// Sets up sandbox `id`'s network: namespace, CNI ADD, tap joined to the CNI interface.
/// Returns the state and the tap's descriptor for the VMM. On failure nothing is left.
pub fn setup(config: &NetworkConfig, id: &str) -> Result<(NetworkState, OwnedFd), NetworkError> {
    let list = cni::load(&config.conf_dir, config.network.as_deref())?;
    let list_copy = list.clone();
    let path = config.netns_dir.join(netns_name(id));
    netns::create(&config.netns_dir, &netns_name(id)).map_err(|source| NetworkError::Netns {
        path: path.clone(),
        source,
    })?;
    let mut state = NetworkState {
        netns: path,
        container_id: id.to_owned(),
        ifname: config.ifname.clone(),
        args: config.args.clone(),
        bin_dirs: config.bin_dirs.clone(),
        list: Some(list),
        result: serde_json::Value::Null,
        guest: GuestInterface {
            mac: String::new(),
            mtu: 0,
            addresses: Vec::new(),
            routes: Vec::new(),
        },
    };
    let attached = (|| {
        state.result = cni::add(&list_copy, &state.attachment())?;
        let (tap, guest) = link::attach(&state.netns, &state.ifname)?;
        state.guest = guest;
        Ok(tap)
    })();
    match attached {
        Ok(tap) => {
            tracing::info!(id, netns = %state.netns.display(), network = %list_copy.name,
                addresses = ?state.guest.addresses, "pod network up");
            Ok((state, tap))
        }
        Err(e) => {
            // Nothing records this attempt, so it is undone completely now: the namespace
            // goes even if a plugin's DEL failed.
            let undone = cni::del(&list_copy, &state.attachment(), state.cached_result())
                .map_err(NetworkError::from)
                .and(remove_netns(&state.netns));
            if let Err(undo) = undone {
                tracing::warn!(id, "undoing a failed network setup: {undo}");
            }
            Err(e)
        }
    }
}

/// Joins the network namespace at `netns` that someone else (containerd's CRI) made and
/// configured: a tap beside its interface `ifname`, joined to it, for sandbox `id`. Tearing
/// it down is theirs; [`teardown`] leaves it alone.
pub fn join(netns: &Path, ifname: &str, id: &str) -> Result<(NetworkState, OwnedFd), NetworkError> {
    let (tap, guest) = link::attach(netns, ifname)?;
    tracing::info!(id, netns = %netns.display(), addresses = ?guest.addresses, "joined a pod network");
    let state = NetworkState {
        netns: netns.to_owned(),
        container_id: id.to_owned(),
        ifname: ifname.to_owned(),
        args: Vec::new(),
        bin_dirs: Vec::new(),
        list: None,
        result: serde_json::Value::Null,
        guest,
    };
    Ok((state, tap))
}

/// CNI DEL (with the cached ADD result), then the namespace goes. Repeatable: when DEL fails
/// the namespace stays, so that a later teardown can run DEL in it again. A network the
/// sandbox only joined ([`join`]) is left as it is.
pub fn teardown(state: &NetworkState) -> Result<(), NetworkError> {
    let Some(list) = &state.list else {
        return Ok(());
    };
    cni::del(list, &state.attachment(), state.cached_result())?;
    remove_netns(&state.netns)?;
    tracing::info!(id = %state.container_id, "pod network removed");
    Ok(())
}

fn remove_netns(path: &std::path::Path) -> Result<(), NetworkError> {
    netns::remove(path).map_err(|source| NetworkError::Netns {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(result: serde_json::Value) -> NetworkState {
        NetworkState {
            netns: "/run/netns/crx-p".into(),
            container_id: "p".into(),
            ifname: "eth0".into(),
            args: Vec::new(),
            bin_dirs: vec!["/usr/lib/cni".into()],
            list: Some(
                serde_json::from_str(
                    r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}"#,
                )
                .unwrap(),
            ),
            result,
            guest: GuestInterface {
                mac: "0a:58:0a:00:00:05".into(),
                mtu: 1450,
                addresses: vec!["10.0.0.5/24".into()],
                routes: vec![
                    GuestRoute {
                        destination: "10.9.0.1/32".into(),
                        gateway: String::new(),
                    },
                    GuestRoute {
                        destination: "default".into(),
                        gateway: "10.0.0.1".into(),
                    },
                ],
            },
        }
    }

    #[test]
    fn the_guest_gets_the_interface_routes_and_cni_dns() {
        let state = state(serde_json::json!({
            "cniVersion": "1.0.0",
            "ips": [{"address": "10.0.0.5/24", "gateway": "10.0.0.1", "interface": 2}],
            "dns": {"nameservers": ["10.0.0.10"], "domain": "cluster.local", "options": ["ndots:5"]}
        }));
        let mut request = ConfigureSandbox::default();
        state.apply_to(&mut request);
        assert_eq!(
            request.interfaces,
            vec![Interface {
                name: "eth0".into(),
                mac: "0a:58:0a:00:00:05".into(),
                addresses: vec!["10.0.0.5/24".into()],
                mtu: 1450,
            }]
        );
        let routes: Vec<_> = request
            .routes
            .iter()
            .map(|r| {
                (
                    r.destination.as_str(),
                    r.gateway.as_str(),
                    r.device.as_str(),
                )
            })
            .collect();
        assert_eq!(
            routes,
            [("10.9.0.1/32", "", "eth0"), ("default", "10.0.0.1", "eth0")]
        );
        assert_eq!(
            request.dns,
            Some(Dns {
                servers: vec!["10.0.0.10".into()],
                searches: vec!["cluster.local".into()],
                options: vec!["ndots:5".into()],
            })
        );

        // The request's own DNS (the CRI's DNSConfig) wins; a result without DNS gives none.
        let mut request = ConfigureSandbox {
            dns: Some(Dns {
                servers: vec!["1.1.1.1".into()],
                ..Dns::default()
            }),
            ..ConfigureSandbox::default()
        };
        state.apply_to(&mut request);
        assert_eq!(request.dns.unwrap().servers, ["1.1.1.1"]);
        assert_eq!(
            super::tests::state(serde_json::json!({"cniVersion": "1.0.0"})).dns(),
            None
        );
    }

    #[test]
    fn state_survives_a_round_trip_through_json() {
        let state = state(serde_json::json!({"cniVersion": "1.0.0", "ips": []}));
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<NetworkState>(&json).unwrap(), state);
    }
}
