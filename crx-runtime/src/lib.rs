//! crx-runtime: CRX's host runtime library, shared by the `crx` command line and the CRI shim.
//!
//! - [`agent`]: the client of the guest agent (requests on vsock port 1024, stdio on 1025).
//! - [`sandbox`]: one `crx-vmm` process per pod VM, its state directory, start/stop/remove.
//! - [`network`]: pod networking: network namespace, CNI, the tap joined to the CNI interface.
//! - [`spec`]: a container's OCI runtime spec from the image's run config and overrides.
//! - [`pod`]: pods and their containers: image leases, root filesystems, the agent's
//!   containers, stopping them, exit codes.
//! - [`seccomp`]: containers' seccomp profiles: Kubernetes' RuntimeDefault, Localhost files.
//! - [`share`]: the container share of a pod VM with several containers.
//! - [`template`]: pod templates: a sandbox VM snapshotted once its agent answers, restored
//!   for every later sandbox of the same shape.

pub mod agent;
pub mod network;
pub mod pod;
pub mod sandbox;
pub mod seccomp;
pub mod share;
pub mod spec;
pub mod template;
