//! `containerd-shim-crx-v2`: containerd's runtime v2 shim for CRX. With
//! `runtime_type = "io.containerd.crx.v2"` containerd runs each pod (each `ctr run` container)
//! in a CRX microVM: one shim process per pod serves containerd's task API over ttrpc, boots the
//! pod VM when the pod's first task is created and has the guest agent run every container of
//! the pod in it.
//!
//! - [`shim`]: the shim's lifecycle (start, delete, the pod grouping) and its settings.
//! - [`service`]: the task service: create/start/wait/kill/delete/exec/state… on the pod VM.
//! - [`process`]: a container's or exec's process as containerd sees it: stdio FIFOs, exit.
//! - [`rootfs`]: containerd's snapshot mounted on the bundle's `rootfs`.
//! - [`guest_spec`]: a containerd bundle's OCI spec made fit for the guest.

mod guest_spec;
mod process;
mod rootfs;
mod service;
mod shim;

fn main() {
    let config = containerd_shim::Config {
        // The shim's children (the VMM) are waited for by the runtime library, not by a
        // reaper of any child.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<shim::CrxShim>(shim::RUNTIME_ID, Some(config));
}
