//! crx-runtime: CRX's host runtime library, shared by the `crx` command line and the CRI shim.
//! For now it owns [`agent`], the client of the guest agent.

pub mod agent;
