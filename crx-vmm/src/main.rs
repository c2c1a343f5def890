//! `crx-vmm`: one microVM per process. Direct-boots a kernel (the default guest unless told
//! otherwise), or restores a snapshot (`--restore DIR`), waits for it to end, reports the boot
//! time and passes the guest command's exit status through. `crx boot` execs it; it links only
//! crx-core, so the host memory each pod VM costs is this small binary's, not the whole CLI's.

mod seccomp;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use crx_core::{ConsoleOutput, CpuTemplate, MemoryBacking, RestoreConfig, VmConfig, VmExit, Vmm};
use crx_virtio::{BlockConfig, DeviceConfig, FsConfig, NetConfig, TapSource, VsockConfig};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

#[derive(clap::Parser)]
#[command(
    name = "crx-vmm",
    version,
    about = "Boot one microVM and wait for it (crx boot)"
)]
struct BootArgs {
    /// Kernel: ELF vmlinux (PVH or 64-bit entry) or bzImage [default: the default guest's vmlinux]
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initrd (cpio) [default: the default guest's initrd, when booting the default kernel]
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: console on ttyS0, quiet, reboot=k, panic=-1, no PCI]
    #[arg(long)]
    cmdline: Option<String>,
    /// The initrd's program to run as PID 1 (adds `rdinit=PATH` to the command line), e.g.
    /// /bin/crx-agent for a pod VM [default: /init, crx-init]
    #[arg(long)]
    init: Option<String>,
    /// Directory for the VM's host sockets (virtiofsd's vhost-user sockets), created 0700
    /// [default: $XDG_RUNTIME_DIR/crx or /run/crx]
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    #[arg(long, default_value_t = 128)]
    mem_mib: u32,
    /// CPU template: host or baseline
    #[arg(long, default_value_t = CpuTemplate::Host)]
    cpu_template: CpuTemplate,
    /// Write the guest console to this file instead of stdout
    #[arg(long)]
    console: Option<PathBuf>,
    /// Attach a raw disk image as virtio-blk: PATH[,ro][,serial=ID] (repeatable; /dev/vda, vdb, …)
    #[arg(long = "disk", value_parser = parse_disk)]
    disks: Vec<BlockConfig>,
    /// Attach a virtio-net interface on a tap: NAME or fd=N, [,mac=02:..] (repeatable)
    #[arg(long = "net", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// Share a host directory over virtio-fs (a virtiofsd child): TAG=DIR[,ro] (repeatable; the guest
    /// mounts it with `mount -t virtiofs TAG /mnt`)
    #[arg(long = "fs", value_parser = parse_fs)]
    shares: Vec<FsConfig>,
    /// Attach a virtio-rng entropy device
    #[arg(long)]
    rng: bool,
    /// Attach a virtio-vsock device: CID,UDS (hybrid vsock: host processes connect to UDS and
    /// write `CONNECT <port>\n`; guest connections to host port P reach `UDS_P`)
    #[arg(long, value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
    /// Restore the snapshot in DIR (its `vmstate` and `memory` files) instead of booting.
    /// Device flags, if any, replace the snapshot's devices one for one, in the order disks,
    /// nets, shares, rng, vsock (the order a boot attaches them in)
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "init", "vcpus", "mem_mib", "cpu_template", "command",
    ])]
    restore: Option<PathBuf>,
    /// How a restored VM's RAM is backed: `private` (the memory file mapped copy-on-write),
    /// `copy` (copied into a memfd up front) or `lazy` (a memfd filled page by page on first
    /// touch, through userfaultfd) [default: lazy with a virtio-fs device, which virtiofsd must
    /// map, else private]
    #[arg(long, value_name = "KIND", value_parser = parse_memory_backing, requires = "restore")]
    restore_memory: Option<MemoryBacking>,
    /// On SIGUSR1, pause the VM, write a snapshot of it to DIR, end it and exit 0 (how a pod
    /// template is made once its guest is ready). SIGTERM or SIGINT always end the VM at once
    /// and exit 0 once its devices (and virtiofsd) are torn down
    #[arg(long, value_name = "DIR")]
    snapshot_on_sigusr1: Option<PathBuf>,
    /// Run without the seccomp filter the VMM otherwise puts on itself once its VM is built
    /// (for debugging only)
    #[arg(long)]
    no_seccomp: bool,
    /// Command for the guest's init to run (after `--`)
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let launch = crx_core::launch::launch_instant();
    // An EnvFilter costs milliseconds to build; only pay for it when CRX_LOG asks for one.
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match tracing_subscriber::EnvFilter::try_from_env("CRX_LOG") {
        Ok(filter) => logs.with_env_filter(filter).init(),
        Err(_) => logs.with_max_level(tracing::Level::WARN).init(),
    }
    let code = run(<BootArgs as clap::Parser>::parse(), launch)?;
    std::process::exit(code)
}

/// Boots (or restores), waits, prints how the guest ended; returns the process exit code.
fn run(args: BootArgs, launch: Instant) -> anyhow::Result<i32> {
    let confine = !args.no_seccomp;
    let console = args
        .console
        .clone()
        .map_or(ConsoleOutput::Stdout, ConsoleOutput::File);
    let devices: Vec<DeviceConfig> = args
        .disks
        .iter()
        .cloned()
        .map(DeviceConfig::Block)
        .chain(args.nets.iter().cloned().map(DeviceConfig::Net))
        .chain(args.shares.iter().map(|share| {
            DeviceConfig::Fs(FsConfig {
                socket_dir: args.runtime_dir.clone(),
                ..share.clone()
            })
        }))
        .chain(args.rng.then_some(DeviceConfig::Rng))
        .chain(args.vsock.clone().map(DeviceConfig::Vsock))
        .collect();
    // Registered before the VM starts, so a signal sent as soon as the guest is ready counts.
    let snapshot_dir = args.snapshot_on_sigusr1.clone();
    let watched: &[i32] = match snapshot_dir {
        Some(_) => &[SIGTERM, SIGINT, SIGUSR1],
        None => &[SIGTERM, SIGINT],
    };
    let signals = Signals::new(watched).context("cannot watch for signals")?;
    let vmm = match &args.restore {
        Some(dir) => {
            let mut config = RestoreConfig::new(dir);
            config.console = console;
            config.memory_backing = match args.restore_memory {
                Some(backing) => backing,
                None if devices.iter().any(|d| matches!(d, DeviceConfig::Fs(_))) => {
                    MemoryBacking::LazyMemfd
                }
                None => MemoryBacking::Private,
            };
            config.devices = (!devices.is_empty()).then_some(devices);
            crx_core::builder::restore_vm_at(&config, launch)
                .with_context(|| format!("cannot restore the snapshot in {}", dir.display()))?
        }
        None => {
            let config = boot_config(args, console, devices)?;
            crx_core::builder::start_vm_at(&config, launch).context("cannot boot the guest")?
        }
    };
    if confine {
        seccomp::install().context("cannot confine the VMM")?;
    }
    let (outcome, stopped_by_signal) = match wait_or_signal(vmm, snapshot_dir.as_deref(), signals)?
    {
        Ending::Outcome(outcome) => (outcome, false),
        Ending::Stopped(outcome) => (outcome, true),
        Ending::Snapshot(dir) => {
            eprintln!("crx: snapshot written to {}", dir.display());
            return Ok(0);
        }
    };
    let ms = |d: Option<std::time::Duration>| {
        d.map_or("-".to_string(), |d| {
            format!("{:.1} ms", d.as_secs_f64() * 1e3)
        })
    };
    eprintln!(
        "crx: {}; boot time {} (launch → guest init), VMM setup {} (launch → first instruction)",
        outcome.exit,
        ms(outcome.times.guest_init),
        ms(outcome.times.first_instruction)
    );
    if !stopped_by_signal
        && !matches!(
            outcome.exit,
            VmExit::Exited(_) | VmExit::Reset | VmExit::PowerOff
        )
    {
        eprintln!("crx: last console output:\n{}", outcome.console_tail);
    }
    Ok(if stopped_by_signal {
        0
    } else {
        outcome.exit.exit_code()
    })
}

/// How the wait for a VM ended.
enum Ending {
    /// The VM ended by itself (or a device or vCPU failure ended it).
    Outcome(crx_core::VmOutcome),
    /// SIGTERM or SIGINT stopped it: an orderly stop the host asked for.
    Stopped(crx_core::VmOutcome),
    /// SIGUSR1 snapshotted it into this directory, then ended it.
    Snapshot(std::path::PathBuf),
}

/// Waits for the VM to end or for one of `signals`: SIGTERM or SIGINT stop the VM, SIGUSR1
/// (watched only with a `snapshot_dir`) snapshots it into `snapshot_dir` and ends it.
fn wait_or_signal(
    vmm: Vmm,
    snapshot_dir: Option<&std::path::Path>,
    mut signals: Signals,
) -> anyhow::Result<Ending> {
    let (tx, rx) = std::sync::mpsc::channel();
    let latch = vmm.exit_latch();
    let ended = tx.clone();
    std::thread::spawn(move || {
        latch.wait(None);
        let _ = ended.send(None);
    });
    let handle = signals.handle();
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let _ = tx.send(Some(signal));
        }
    });
    let event = rx.recv().unwrap_or(None);
    handle.close();
    match (event, snapshot_dir) {
        (None, _) => Ok(Ending::Outcome(vmm.wait())),
        (Some(SIGUSR1), Some(dir)) => {
            let taken = vmm.pause().and_then(|()| vmm.snapshot(dir));
            vmm.stop();
            let outcome = vmm.wait();
            match taken {
                Ok(_) => Ok(Ending::Snapshot(dir.to_path_buf())),
                Err(e) => Err(anyhow::Error::new(e).context(format!(
                    "cannot snapshot the VM into {} (it ended: {})",
                    dir.display(),
                    outcome.exit
                ))),
            }
        }
        (Some(signal), _) => {
            tracing::info!(signal, "stopping the VM on a signal");
            vmm.stop();
            Ok(Ending::Stopped(vmm.wait()))
        }
    }
}

/// The VM a boot describes: the default guest unless told otherwise.
fn boot_config(
    args: BootArgs,
    console: ConsoleOutput,
    devices: Vec<DeviceConfig>,
) -> anyhow::Result<VmConfig> {
    let (kernel, initrd) = match args.kernel {
        Some(kernel) => (kernel, args.initrd),
        None => {
            let dir = crx_core::builder::default_guest_dir();
            let kernel = dir.join("vmlinux");
            anyhow::ensure!(
                kernel.exists(),
                "no default guest at {} (build it with `cargo xtask guest`, or pass --kernel)",
                dir.display()
            );
            (
                kernel,
                args.initrd.or_else(|| Some(dir.join("initrd.cpio"))),
            )
        }
    };
    let mut config = VmConfig::new(kernel);
    config.initrd = initrd;
    if let Some(cmdline) = args.cmdline {
        config.cmdline = cmdline;
    }
    if let Some(init) = &args.init {
        anyhow::ensure!(
            !init.is_empty() && !init.contains(char::is_whitespace),
            "--init takes one path without spaces, not {init:?}"
        );
        // Kernel parameters go before ` -- `, after which words are init's arguments.
        let at = config.cmdline.find(" -- ").unwrap_or(config.cmdline.len());
        config.cmdline.insert_str(at, &format!(" rdinit={init}"));
    }
    config.vcpus = args.vcpus;
    config.mem_mib = args.mem_mib;
    config.cpu_template = args.cpu_template;
    config.console = console;
    config.devices = devices;
    Ok(config.with_init_args(&args.command))
}

/// `PATH[,ro][,serial=ID]`
fn parse_disk(spec: &str) -> Result<BlockConfig, String> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("a disk needs a path")?;
    let mut disk = BlockConfig {
        path: PathBuf::from(path),
        read_only: false,
        serial: None,
    };
    for option in parts {
        match option.split_once('=') {
            None if option == "ro" => disk.read_only = true,
            Some(("serial", id)) => disk.serial = Some(id.to_string()),
            _ => return Err(format!("unknown disk option {option:?} (ro, serial=ID)")),
        }
    }
    Ok(disk)
}

/// `TAG=DIR[,ro]`
fn parse_fs(spec: &str) -> Result<FsConfig, String> {
    let (share, read_only) = match spec.strip_suffix(",ro") {
        Some(share) => (share, true),
        None => (spec, false),
    };
    match share.split_once('=') {
        Some((tag, dir)) if !tag.is_empty() && !dir.is_empty() => Ok(FsConfig {
            read_only,
            ..FsConfig::new(tag, dir)
        }),
        _ => Err(format!("a share is TAG=DIR[,ro], not {spec:?}")),
    }
}

/// `CID,UDS`
fn parse_vsock(spec: &str) -> Result<VsockConfig, String> {
    let (cid, uds) = spec
        .split_once(',')
        .ok_or_else(|| format!("a vsock device is CID,UDS, not {spec:?}"))?;
    let guest_cid = cid
        .parse()
        .map_err(|_| format!("the vsock CID must be a number, not {cid:?}"))?;
    if uds.is_empty() {
        return Err("the vsock device needs a Unix socket path".into());
    }
    Ok(VsockConfig {
        guest_cid,
        uds_path: uds.into(),
    })
}

/// `NAME|fd=N[,mac=XX:XX:XX:XX:XX:XX]`
fn parse_memory_backing(s: &str) -> Result<MemoryBacking, String> {
    match s {
        "private" => Ok(MemoryBacking::Private),
        "copy" => Ok(MemoryBacking::Memfd),
        "lazy" => Ok(MemoryBacking::LazyMemfd),
        _ => Err(format!("{s:?}: expected private, copy or lazy")),
    }
}

fn parse_net(spec: &str) -> Result<NetConfig, String> {
    let mut parts = spec.split(',');
    let tap = match parts.next().unwrap_or_default() {
        "" => return Err("a network interface needs a tap name or fd=N".into()),
        first => match first.strip_prefix("fd=") {
            Some(fd) => TapSource::Fd(fd.parse().map_err(|_| format!("bad tap fd {fd:?}"))?),
            None => TapSource::Name(first.to_string()),
        },
    };
    // A locally administered address unless told otherwise.
    let mut mac = [0x02, 0xc7, 0, 0, 0, 1];
    for option in parts {
        match option.split_once('=') {
            Some(("mac", text)) => {
                let bytes: Vec<u8> = text
                    .split(':')
                    .map(|b| u8::from_str_radix(b, 16))
                    .collect::<Result<_, _>>()
                    .map_err(|_| format!("bad MAC {text:?}"))?;
                mac = bytes.try_into().map_err(|_| format!("bad MAC {text:?}"))?;
            }
            _ => return Err(format!("unknown net option {option:?} (mac=…)")),
        }
    }
    Ok(NetConfig { tap, mac })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_and_bad_ones_say_why() {
        let disk = parse_disk("/img,ro,serial=abc").unwrap();
        assert_eq!(disk.path, PathBuf::from("/img"));
        assert!(disk.read_only);
        assert_eq!(disk.serial.as_deref(), Some("abc"));
        assert!(parse_disk("/img,rw").is_err());
        assert!(parse_disk("").is_err());
        let net = parse_net("fd=7,mac=02:00:00:00:00:09").unwrap();
        assert_eq!(net.tap, TapSource::Fd(7));
        assert_eq!(net.mac, [2, 0, 0, 0, 0, 9]);
        assert_eq!(
            parse_net("tap0").unwrap().tap,
            TapSource::Name("tap0".into())
        );
        assert!(parse_net("tap0,mac=zz").is_err());
        assert!(parse_net("fd=x").is_err());
        assert_eq!(parse_fs("share=/srv").unwrap().tag, "share");
        let read_only = parse_fs("share=/srv,ro").unwrap();
        assert!(read_only.read_only && read_only.shared_dir == std::path::Path::new("/srv"));
        assert!(parse_fs("/srv").is_err());
        let vsock = parse_vsock("3,/run/crx/v.sock").unwrap();
        assert_eq!(
            (vsock.guest_cid, vsock.uds_path.to_str()),
            (3, Some("/run/crx/v.sock"))
        );
        assert!(parse_vsock("x,/a").is_err());
        assert!(parse_vsock("3").is_err());
    }
}
