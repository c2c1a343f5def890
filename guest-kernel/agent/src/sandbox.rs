//! ConfigureSandbox: what the VM as a whole gets — hostname, `/etc/resolv.conf`, sysctls, and
//! addresses, MTU and routes of interfaces that exist (through busybox `ip`; an interface or
//! route device that does not exist is reported as skipped, not an error).

use std::path::Path;
use std::process::{Command, Stdio};

use crx_agent_proto::{ConfigureReply, ConfigureSandbox, ErrorCode};
use nix::unistd::Pid;

use crate::reaper::{Exit, Reaper};
use crate::{fail, io_fail, Result};

pub fn configure(reaper: &Reaper, req: &ConfigureSandbox) -> Result<ConfigureReply> {
    let mut skipped = Vec::new();
    if !req.hostname.is_empty() {
        nix::unistd::sethostname(&req.hostname)
            .map_err(|e| fail(ErrorCode::BadRequest, format!("hostname: {e}")))?;
    }
    if let Some(dns) = &req.dns {
        let mut conf = String::new();
        for server in &dns.servers {
            conf += &format!("nameserver {server}\n");
        }
        if !dns.searches.is_empty() {
            conf += &format!("search {}\n", dns.searches.join(" "));
        }
        if !dns.options.is_empty() {
            conf += &format!("options {}\n", dns.options.join(" "));
        }
        std::fs::write("/etc/resolv.conf", conf).map_err(io_fail("/etc/resolv.conf"))?;
    }
    for (key, value) in &req.sysctls {
        if key
            .split(['.', '/'])
            .any(|part| part.is_empty() || part == "..")
        {
            return Err(fail(ErrorCode::BadRequest, format!("bad sysctl {key:?}")));
        }
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        std::fs::write(&path, value).map_err(io_fail(&format!("sysctl {key}")))?;
    }
    for iface in &req.interfaces {
        if !interface_exists(&iface.name) {
            skipped.push(format!("interface {}: not present", iface.name));
            continue;
        }
        if !iface.mac.is_empty() {
            ip(
                reaper,
                &["link", "set", "dev", &iface.name, "address", &iface.mac],
            )?;
        }
        if iface.mtu != 0 {
            ip(
                reaper,
                &[
                    "link",
                    "set",
                    "dev",
                    &iface.name,
                    "mtu",
                    &iface.mtu.to_string(),
                ],
            )?;
        }
        for address in &iface.addresses {
            ip(reaper, &["addr", "add", address, "dev", &iface.name])?;
        }
        ip(reaper, &["link", "set", "dev", &iface.name, "up"])?;
    }
    for route in &req.routes {
        if !route.device.is_empty() && !interface_exists(&route.device) {
            skipped.push(format!(
                "route {}: device {} not present",
                route.destination, route.device
            ));
            continue;
        }
        let mut args = vec!["route", "add", route.destination.as_str()];
        if !route.gateway.is_empty() {
            args.extend(["via", route.gateway.as_str()]);
        }
        if !route.device.is_empty() {
            args.extend(["dev", route.device.as_str()]);
        }
        ip(reaper, &args)?;
    }
    Ok(ConfigureReply { skipped })
}

fn interface_exists(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && Path::new("/sys/class/net").join(name).exists()
}

/// Runs busybox `ip ARGS` (reaped through the reaper, which owns every child).
fn ip(reaper: &Reaper, args: &[&str]) -> Result<()> {
    let mut child = None;
    let pid = reaper
        .spawn(|| {
            let spawned = Command::new("/bin/ip")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()?;
            let pid = Pid::from_raw(spawned.id() as i32);
            child = Some(spawned);
            Ok(pid)
        })
        .map_err(io_fail("running ip"))?;
    let mut message = String::new();
    if let Some(stderr) = child.and_then(|mut c| c.stderr.take()) {
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut message);
    }
    match reaper.wait(pid) {
        Exit::Code(0) => {
            reaper.forget(pid);
            Ok(())
        }
        _ => {
            reaper.forget(pid);
            Err(fail(
                ErrorCode::Internal,
                format!("ip {}: {}", args.join(" "), message.trim()),
            ))
        }
    }
}
