//! `crx run`, `crx exec`, `crx ps`, `crx stop`, `crx rm`: containers in their own microVMs,
//! on the runtime library (`crx-runtime`: sandboxes, the agent client, pods). This file owns
//! only the terminal side: flags, stdio forwarding, raw mode and window size for `-t`, and
//! exit codes (the container's, 128 + signal, or 137 with a message when it was OOM-killed).

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use crx_agent_proto::{ExecProcess, ExitStatus};
use crx_image::{ImageRecord, Store};
use crx_runtime::agent::{AgentError, Output, StdioAttachment};
use crx_runtime::network::{self, NetworkConfig};
use crx_runtime::pod::{
    build_template, create_pod, remove_pod, stop_container, PodRequest, COMMAND_LABEL, IMAGE_LABEL,
};
use crx_runtime::sandbox::{Sandbox, DEFAULT_RUN_ROOT};
use crx_runtime::share::{Propagation, Volume};
use crx_runtime::spec::ProcessOverrides;
use crx_runtime::template::templates_dir;

use crate::image::StoreArgs;

/// How long a guest may take to boot and answer (the test host is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a VMM whose guest connection broke off gets to exit (and log why) before the error
/// is reported.
const VMM_EXIT_GRACE: Duration = Duration::from_secs(5);

/// Where sandboxes live.
#[derive(clap::Args, Debug, Clone)]
pub struct RunRootArgs {
    /// Sandbox state directory [default: $CRX_RUN_ROOT or /run/crx].
    #[arg(long = "run-root", value_name = "DIR")]
    run_root: Option<PathBuf>,
}

impl RunRootArgs {
    fn dir(&self) -> PathBuf {
        self.run_root
            .clone()
            .or_else(|| std::env::var_os("CRX_RUN_ROOT").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_ROOT))
    }
}

/// A pod network for `crx run`, from CNI configuration and plugins.
#[derive(clap::Args, Debug)]
pub struct NetworkArgs {
    /// Join the VM to this CNI network (a configuration list's `name` in --cni-conf-dir; the
    /// pod gets its address, routes and DNS from it) [default: no network]. "default": the
    /// first configuration in name order, as kubelet picks it.
    #[arg(long, value_name = "NAME")]
    network: Option<String>,
    /// Where CNI network configurations are read from.
    #[arg(long, value_name = "DIR", default_value = network::DEFAULT_CONF_DIR, requires = "network")]
    cni_conf_dir: PathBuf,
    /// Where CNI plugins are looked for (repeatable) [default: /usr/lib/cni, /opt/cni/bin].
    #[arg(long = "cni-bin-dir", value_name = "DIR", requires = "network")]
    cni_bin_dirs: Vec<PathBuf>,
}

impl NetworkArgs {
    fn config(&self) -> Option<NetworkConfig> {
        let name = self.network.as_ref()?;
        let mut config = NetworkConfig {
            conf_dir: self.cni_conf_dir.clone(),
            network: (name != "default").then(|| name.clone()),
            ..NetworkConfig::default()
        };
        if !self.cni_bin_dirs.is_empty() {
            config.bin_dirs = self.cni_bin_dirs.clone();
        }
        Some(config)
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// vCPUs of the VM.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Memory of the VM, MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u32,
    /// Environment entry KEY=VALUE (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Allocate a terminal for the container (and forward stdin).
    #[arg(short = 't', long)]
    tty: bool,
    /// Forward stdin to the container.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Leave the container running in the background and print its id.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Container (and VM) id [default: generated].
    #[arg(long)]
    name: Option<String>,
    /// user, uid, user:group or uid:gid [default: the image's].
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Working directory [default: the image's, else /].
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    /// Memory limit of the container's cgroup in the VM, MiB.
    #[arg(long, value_name = "MIB")]
    memory_limit_mib: Option<i64>,
    /// Guest kernel [default: the installed default guest].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initrd [default: the installed default guest's].
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Boot the VM's kernel instead of restoring it from the pod template (made on first use;
    /// see `crx template build`).
    #[arg(long)]
    cold: bool,
    /// Bind a host file or directory into the container, read-only with `:ro` (repeatable;
    /// HOST may be relative to the working directory).
    #[arg(short = 'v', long = "volume", value_name = "HOST:CONTAINER[:ro|:rw]")]
    volumes: Vec<String>,
    #[command(flatten)]
    network: NetworkArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    runtime: RunRootArgs,
    /// An OCI image layout (directory or archive), or an image reference: from the store, else
    /// pulled.
    image: String,
    /// Command and arguments [default: the image's].
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum PodCommand {
    /// Run a container of IMAGE in its own microVM; exits with the container's exit code.
    Run(Box<RunArgs>),
    /// Run a further process in a running container.
    Exec {
        #[arg(short = 't', long)]
        tty: bool,
        #[arg(short = 'i', long)]
        interactive: bool,
        #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        #[arg(short = 'w', long)]
        workdir: Option<String>,
        #[command(flatten)]
        runtime: RunRootArgs,
        id: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Pod templates: VMs snapshotted once their agent answers, restored for `crx run`.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// List containers (one microVM each).
    Ps {
        #[command(flatten)]
        runtime: RunRootArgs,
    },
    /// Stop a container: SIGTERM, then SIGKILL after --time seconds, then power its VM off.
    Stop {
        #[arg(long, default_value_t = 10)]
        time: u64,
        #[command(flatten)]
        runtime: RunRootArgs,
        id: String,
    },
    /// Remove stopped containers (-f: running ones too) and every host resource of their VMs.
    Rm {
        #[arg(short = 'f', long)]
        force: bool,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        runtime: RunRootArgs,
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// Runs `cmd`; returns the exit code for `crx`.
#[derive(clap::Subcommand, Debug)]
pub enum TemplateCommand {
    /// Make the template `crx run` with these settings restores from (if there is none yet) and
    /// print its directory.
    Build {
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        #[arg(long, default_value_t = 256)]
        mem_mib: u32,
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// The template of pods with a network (`crx run --network`).
        #[arg(long)]
        with_network: bool,
        #[command(flatten)]
        runtime: RunRootArgs,
    },
    /// Remove every template (the next `crx run` makes its own again).
    Rm {
        #[command(flatten)]
        runtime: RunRootArgs,
    },
}

pub fn run(cmd: PodCommand) -> anyhow::Result<i32> {
    match cmd {
        PodCommand::Template(TemplateCommand::Build {
            vcpus,
            mem_mib,
            kernel,
            initrd,
            with_network,
            runtime,
        }) => {
            let request = PodRequest {
                id: "template".into(),
                vcpus,
                mem_mib,
                kernel,
                initrd,
                vmm: vmm_binary()?,
                process: ProcessOverrides::default(),
                boot_timeout: BOOT_TIMEOUT,
                template: true,
                // Only whether there is one counts: each pod's network is its own.
                network: with_network.then(NetworkConfig::default),
                volumes: Vec::new(),
            };
            let dir = build_template(&runtime.dir(), &request)?;
            println!("{}", dir.display());
            Ok(0)
        }
        PodCommand::Template(TemplateCommand::Rm { runtime }) => {
            let dir = templates_dir(&runtime.dir());
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(0),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
                Err(e) => Err(anyhow::Error::new(e).context(format!("removing {}", dir.display()))),
            }
        }
        PodCommand::Run(args) => run_container(*args),
        PodCommand::Exec {
            tty,
            interactive,
            env,
            workdir,
            runtime,
            id,
            command,
        } => exec(&runtime.dir(), &id, command, env, workdir, tty, interactive),
        PodCommand::Ps { runtime } => ps(&runtime.dir()).map(|()| 0),
        PodCommand::Stop { time, runtime, id } => {
            stop(&runtime.dir(), &id, Duration::from_secs(time)).map(|()| 0)
        }
        PodCommand::Rm {
            force,
            store,
            runtime,
            ids,
        } => {
            let store = store.open()?;
            for id in &ids {
                let mut sandbox = Sandbox::open(&runtime.dir(), id)?;
                anyhow::ensure!(
                    force || !sandbox.is_running(),
                    "container {id} is running: stop it first, or use rm -f"
                );
                remove_pod(&runtime.dir(), &store, id, Duration::ZERO)
                    .with_context(|| format!("removing {id}"))?;
                println!("{id}");
            }
            Ok(0)
        }
    }
}

/// `HOST:CONTAINER[:ro|:rw]` as a volume: the host path made absolute and resolved (it must
/// exist), the container path absolute.
fn parse_volume(spec: &str) -> anyhow::Result<Volume> {
    let bad = || anyhow::anyhow!("volume {spec:?} is not HOST:CONTAINER[:ro|:rw]");
    let mut parts = spec.split(':');
    let (host, container) = (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
    let read_only = match parts.next() {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(_) => return Err(bad()),
    };
    if host.is_empty() || !container.starts_with('/') || parts.next().is_some() {
        return Err(bad());
    }
    let host_path = std::fs::canonicalize(host)
        .with_context(|| format!("volume {spec:?}: host path {host:?}"))?;
    Ok(Volume {
        host_path,
        container_path: container.to_owned(),
        read_only,
        recursive_read_only: false,
        propagation: Propagation::Private,
    })
}

fn run_container(args: RunArgs) -> anyhow::Result<i32> {
    let store = args.store.open()?;
    let image = resolve_image(&store, &args.image)?;
    let id = args.name.clone().unwrap_or_else(generated_id);
    let request = PodRequest {
        id: id.clone(),
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        vmm: vmm_binary()?,
        process: ProcessOverrides {
            entrypoint: None,
            args: args.command.clone(),
            env: args.env.clone(),
            cwd: args.workdir.clone(),
            user: args.user.clone(),
            terminal: args.tty,
            hostname: Some(id.chars().take(63).collect()),
            memory_limit: args.memory_limit_mib.map(|m| m << 20),
            security: Default::default(),
        },
        boot_timeout: BOOT_TIMEOUT,
        template: !args.cold,
        network: args.network.config(),
        volumes: args
            .volumes
            .iter()
            .map(|v| parse_volume(v))
            .collect::<anyhow::Result<_>>()?,
    };
    let run_root = &args.runtime.dir();
    let mut pod = create_pod(run_root, &store, &image, &request)
        .with_context(|| format!("creating container {id} from {}", image.name))?;
    if args.detach {
        pod.agent
            .start_container(&id)
            .with_context(|| format!("starting {id}"))?;
        println!("{id}");
        return Ok(0);
    }
    let vsock = pod.sandbox.vsock_path();
    let outcome = (|| {
        let attachment = StdioAttachment::attach(&vsock, Instant::now() + BOOT_TIMEOUT, &id, "")?;
        pod.agent.start_container(&id)?;
        forward(attachment, args.tty, args.interactive || args.tty)
    })();
    let outcome = outcome.map_err(|e| {
        // Only a stream cut short hints at a VM that is going down.
        let grace = match e.downcast_ref::<AgentError>() {
            Some(AgentError::Closed | AgentError::Io(_) | AgentError::Frame(_)) => VMM_EXIT_GRACE,
            _ => Duration::ZERO,
        };
        e.context(format!(
            "container {id}; {}; its VM's log:\n{}",
            pod.sandbox.vmm_condition(grace),
            pod.sandbox.log_tail()
        ))
    });
    let removed = remove_pod(run_root, &store, &id, Duration::from_secs(10));
    let status = outcome?;
    removed.with_context(|| format!("removing {id}"))?;
    Ok(exit_code(&id, &status))
}

/// An image layout on disk is imported; a reference is looked up in the store, else pulled.
fn resolve_image(store: &Store, image: &str) -> anyhow::Result<ImageRecord> {
    let path = Path::new(image);
    if path.exists() {
        let records = store.import(path, None).or_else(|_| {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|s| !s.is_empty())
                .unwrap_or("image")
                .to_ascii_lowercase();
            store.import(path, Some(&format!("localhost/{stem}:latest")))
        });
        let mut records = records.with_context(|| format!("importing {}", path.display()))?;
        anyhow::ensure!(
            records.len() == 1,
            "{} holds {} linux/amd64 images; import it with `crx image import` and run one by name",
            path.display(),
            records.len()
        );
        return Ok(records.remove(0));
    }
    match store.image(image) {
        Ok(record) => Ok(record),
        Err(crx_image::Error::ImageNotFound(_)) => crate::image::pull(store, image),
        Err(e) => Err(e.into()),
    }
}

/// `crx-vmm`, installed beside `crx`.
pub fn vmm_binary() -> anyhow::Result<PathBuf> {
    let vmm = std::env::current_exe()
        .context("cannot find crx's own path")?
        .with_file_name("crx-vmm");
    anyhow::ensure!(
        vmm.exists(),
        "{} is missing (it is built and installed beside crx)",
        vmm.display()
    );
    Ok(vmm)
}

fn generated_id() -> String {
    let mut bytes = [0u8; 6];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 0–255 from the exit status; a signal gives 128 + signal; OOM kills are said on stderr.
fn exit_code(id: &str, status: &ExitStatus) -> i32 {
    if status.oom_killed {
        eprintln!("crx: container {id} was OOM-killed (its memory limit was reached)");
    }
    crx_runtime::pod::exit_code(status)
}

/// Streams one process's stdio to this terminal until it exits: stdout and stderr to ours,
/// ours to its stdin when `stdin`; with `tty`, our terminal goes raw and its size follows ours.
fn forward(attachment: StdioAttachment, tty: bool, stdin: bool) -> anyhow::Result<ExitStatus> {
    let (mut input, mut output) = attachment.split();
    let _raw = if tty && std::io::stdin().is_terminal() {
        if let Some((rows, cols)) = terminal_size() {
            input.resize(rows, cols)?;
        }
        Some(RawMode::enable()?)
    } else {
        None
    };
    if stdin {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            let mut last_size = terminal_size();
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = input.close_stdin();
                        return;
                    }
                    Ok(n) => {
                        if input.write_stdin(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
                // The window size is rechecked on each keystroke batch: no signal handler.
                let size = terminal_size();
                if tty && size != last_size {
                    if let Some((rows, cols)) = size {
                        let _ = input.resize(rows, cols);
                    }
                    last_size = size;
                }
            }
        });
    } else {
        input.close_stdin()?;
    }
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        match output.next_output()? {
            Output::Stdout(data) => {
                stdout.write_all(&data)?;
                stdout.flush()?;
            }
            Output::Stderr(data) => {
                stderr.write_all(&data)?;
                stderr.flush()?;
            }
            Output::StdoutEof | Output::StderrEof => {}
            Output::Exit(status) => return Ok(status),
        }
    }
}

/// Our terminal's rows and columns.
fn terminal_size() -> Option<(u32, u32)> {
    let size = rustix::termios::tcgetwinsize(std::io::stdin()).ok()?;
    (size.ws_row > 0).then_some((u32::from(size.ws_row), u32::from(size.ws_col)))
}

/// Our terminal in raw mode until dropped.
struct RawMode(rustix::termios::Termios);

impl RawMode {
    fn enable() -> anyhow::Result<RawMode> {
        use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};
        let saved = tcgetattr(std::io::stdin()).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(std::io::stdin(), OptionalActions::Now, &raw)
            .context("setting the terminal raw")?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.0,
        );
    }
}

fn exec(
    run_root: &Path,
    id: &str,
    command: Vec<String>,
    env: Vec<String>,
    workdir: Option<String>,
    tty: bool,
    interactive: bool,
) -> anyhow::Result<i32> {
    let mut sandbox = Sandbox::open(run_root, id)?;
    anyhow::ensure!(sandbox.is_running(), "container {id} is not running");
    let mut agent = sandbox.agent(Instant::now() + BOOT_TIMEOUT)?;
    let exec_id = generated_id();
    let env = crx_runtime::spec::exec_env(env);
    agent
        .exec_process(ExecProcess {
            container_id: id.into(),
            exec_id: exec_id.clone(),
            args: command,
            env,
            cwd: workdir.unwrap_or_default(),
            user: None,
            terminal: tty,
        })
        .with_context(|| format!("exec in {id}"))?;
    let attachment = StdioAttachment::attach(
        &sandbox.vsock_path(),
        Instant::now() + BOOT_TIMEOUT,
        id,
        &exec_id,
    )?;
    let status = forward(attachment, tty, interactive || tty)?;
    Ok(exit_code(id, &status))
}

fn ps(run_root: &Path) -> anyhow::Result<()> {
    println!(
        "{:<16} {:<40} {:<10} {:>5} {:>8} {:>8}  COMMAND",
        "ID", "IMAGE", "STATUS", "VCPUS", "MEM_MIB", "VMM_PID"
    );
    for sandbox in Sandbox::list(run_root)? {
        let mut sandbox = match sandbox {
            Ok(s) => s,
            Err(e) => {
                eprintln!("crx: {e}");
                continue;
            }
        };
        let running = sandbox.is_running();
        let state = sandbox.state().clone();
        let label = |k: &str| state.labels.get(k).cloned().unwrap_or_default();
        println!(
            "{:<16} {:<40} {:<10} {:>5} {:>8} {:>8}  {}",
            state.id,
            label(IMAGE_LABEL),
            if running { "running" } else { "exited" },
            state.vcpus,
            state.mem_mib,
            state.vmm_pid,
            label(COMMAND_LABEL)
        );
    }
    Ok(())
}

fn stop(run_root: &Path, id: &str, grace: Duration) -> anyhow::Result<()> {
    let mut sandbox = Sandbox::open(run_root, id)?;
    if sandbox.is_running() {
        let mut agent = sandbox.agent(Instant::now() + Duration::from_secs(10))?;
        stop_container(&mut agent, id, grace);
        sandbox.stop(Duration::from_secs(10));
    }
    println!("{id}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_parse_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().display().to_string();
        let rw = parse_volume(&format!("{host}:/data")).unwrap();
        assert_eq!(rw.host_path, dir.path().canonicalize().unwrap());
        assert_eq!((rw.container_path.as_str(), rw.read_only), ("/data", false));
        assert!(parse_volume(&format!("{host}:/data:ro")).unwrap().read_only);
        assert!(!parse_volume(&format!("{host}:/data:rw")).unwrap().read_only);
        for bad in [
            host.clone(),
            format!("{host}:data"),
            format!("{host}:/data:rx"),
            format!("{host}:/data:ro:x"),
            ":/data".to_string(),
            format!("{host}/missing:/data"),
        ] {
            assert!(parse_volume(&bad).is_err(), "{bad} was accepted");
        }
    }
}
