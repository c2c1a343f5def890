//! Host ports: a pod VM's ports are not the node's, so crx-cri publishes them itself, as a
//! userspace proxy. For every TCP port mapping with a host port, and in a host-network pod for
//! every container port (its ports are meant to be the node's), crx-cri listens on the node
//! and carries each connection into the pod VM through the agent's forwarding channel, to the
//! container port on the VM's loopback. The listeners live from RunPodSandbox to
//! StopPodSandbox, and come back for ready pods when crx-cri restarts.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crx_agent_proto::splice;
use k8s_cri::v1 as cri;
use tonic::Status;

use crate::pods::Runtime;
use crate::records::HostPort;

/// The host ports a pod's port mappings ask for: TCP mappings with a host port, or, in a
/// host-network pod, with their container port as the host port. Other protocols are refused.
pub fn host_ports_of(
    mappings: &[cri::PortMapping],
    host_network: bool,
) -> Result<Vec<HostPort>, Status> {
    let mut ports = Vec::new();
    for mapping in mappings {
        let port = |value: i32, what: &str| {
            u16::try_from(value)
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| Status::invalid_argument(format!("{what} {value} is not a port")))
        };
        let host_port = if host_network {
            mapping.container_port
        } else {
            mapping.host_port
        };
        if host_port == 0 {
            continue;
        }
        if mapping.protocol() != cri::Protocol::Tcp {
            return Err(Status::invalid_argument(format!(
                "host port {host_port}: only TCP host ports are published"
            )));
        }
        let host_ip = if mapping.host_ip.is_empty() {
            String::new()
        } else {
            mapping
                .host_ip
                .parse::<IpAddr>()
                .map_err(|e| {
                    Status::invalid_argument(format!("host IP {:?}: {e}", mapping.host_ip))
                })?
                .to_string()
        };
        ports.push(HostPort {
            host_ip,
            host_port: port(host_port, "host port")?,
            container_port: port(mapping.container_port, "container port")?,
        });
    }
    Ok(ports)
}

/// One pod's listeners.
#[derive(Default)]
pub struct Published {
    listeners: Vec<Arc<TcpListener>>,
    stopped: Arc<AtomicBool>,
}

impl Published {
    /// Stops accepting (the accept threads see the shutdown and end); connections already
    /// carried go on until either side ends them.
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        for listener in &self.listeners {
            let _ = rustix::net::shutdown(&**listener, rustix::net::Shutdown::Read);
        }
    }
}

/// Every pod's listeners, by pod ID.
pub type PublishedPorts = Mutex<HashMap<String, Published>>;

impl Runtime {
    /// Listens on `ports` for pod `pod`; on failure (a port in use) nothing stays open.
    pub(crate) fn publish_ports(
        self: &Arc<Self>,
        pod: &str,
        ports: &[HostPort],
    ) -> Result<(), Status> {
        if ports.is_empty() {
            return Ok(());
        }
        let mut published = Published::default();
        for port in ports {
            let ip = match port.host_ip.as_str() {
                "" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                ip => ip
                    .parse()
                    .map_err(|e| Status::internal(format!("host IP {ip}: {e}")))?,
            };
            // Nothing listens yet: a failure drops the listeners bound so far.
            let listener = TcpListener::bind(SocketAddr::new(ip, port.host_port)).map_err(|e| {
                Status::failed_precondition(format!(
                    "cannot publish host port {}:{} of pod {pod}: {e}",
                    port.host_ip, port.host_port
                ))
            })?;
            published.listeners.push(Arc::new(listener));
        }
        for (listener, port) in published.listeners.iter().zip(ports) {
            let (runtime, listener, stopped) = (
                Arc::clone(self),
                Arc::clone(listener),
                Arc::clone(&published.stopped),
            );
            let (pod, container_port) = (pod.to_owned(), port.container_port);
            let spawned = std::thread::Builder::new()
                .name("host-port".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stopped.load(Ordering::SeqCst) {
                            break;
                        }
                        match conn {
                            Ok(conn) => runtime.carry(&pod, container_port, conn),
                            Err(e) => tracing::warn!(pod, "host port: accept: {e}"),
                        }
                    }
                });
            if let Err(e) = spawned {
                published.stop();
                return Err(Status::internal(format!(
                    "cannot start a host port thread: {e}"
                )));
            }
        }
        tracing::info!(pod, ports = ?ports.iter().map(|p| p.host_port).collect::<Vec<_>>(), "host ports published");
        if let Some(old) = self
            .host_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod.to_owned(), published)
        {
            old.stop();
        }
        Ok(())
    }

    /// Closes pod `pod`'s listeners, if it has any.
    pub(crate) fn unpublish_ports(&self, pod: &str) {
        let published = self
            .host_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pod);
        if let Some(published) = published {
            published.stop();
            tracing::info!(pod, "host ports closed");
        }
    }

    /// Carries one accepted connection to `container_port` in the pod VM, on threads of its
    /// own.
    fn carry(self: &Arc<Self>, pod: &str, container_port: u16, conn: TcpStream) {
        let (runtime, pod) = (Arc::clone(self), pod.to_owned());
        let spawned = std::thread::Builder::new()
            .name("host-port-conn".into())
            .spawn(move || match runtime.forward_tcp(&pod, container_port) {
                Ok(target) => {
                    if let Err(e) = splice(conn, target, "host-port-in") {
                        tracing::debug!(pod, container_port, "host port connection: {e}");
                    }
                }
                Err(e) => {
                    tracing::info!(pod, container_port, "host port: {}", e.message());
                    let _ = conn.shutdown(Shutdown::Both);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a host port connection thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(container_port: i32, host_port: i32, protocol: cri::Protocol) -> cri::PortMapping {
        cri::PortMapping {
            protocol: protocol as i32,
            container_port,
            host_port,
            host_ip: String::new(),
        }
    }

    #[test]
    fn host_ports_follow_the_mappings_and_host_network() {
        let mappings = [
            mapping(80, 8080, cri::Protocol::Tcp),
            mapping(12003, 0, cri::Protocol::Tcp),
        ];
        let pod = host_ports_of(&mappings, false).unwrap();
        assert_eq!(pod.len(), 1);
        assert_eq!((pod[0].host_port, pod[0].container_port), (8080, 80));
        // In a host-network pod every container port is the node's.
        let host = host_ports_of(&mappings, true).unwrap();
        let ports: Vec<(u16, u16)> = host
            .iter()
            .map(|p| (p.host_port, p.container_port))
            .collect();
        assert_eq!(ports, [(80, 80), (12003, 12003)]);
        assert!(host_ports_of(&[mapping(53, 53, cri::Protocol::Udp)], false).is_err());
        assert!(host_ports_of(&[mapping(80, 70000, cri::Protocol::Tcp)], false).is_err());
        let mut bad_ip = mapping(80, 8080, cri::Protocol::Tcp);
        bad_ip.host_ip = "not an ip".into();
        assert!(host_ports_of(&[bad_ip], false).is_err());
    }
}
