//! Builds a microVM from a [`VmConfig`] and starts it, or restores one from a snapshot
//! ([`RestoreConfig`]): the one place that knows the order of KVM setup steps.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crx_virtio::mmio::{MMIO_WINDOW, QUEUE_NOTIFY};
use crx_virtio::{
    DeviceConfig, EventLoop, Interrupt, MmioTransport, NetConfig, TapSource, VirtioDevice,
};
use kvm_ioctls::{IoEventAddress, Kvm};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::load_cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{
    boot, cpuid, mptable, CMDLINE_MAX_SIZE, CMDLINE_START, GUEST_STATUS_START, I8042_DATA_PORT,
    IRQ_MAX, MAX_VCPUS, MMIO_PAGE_SIZE, SERIAL_IRQ, SERIAL_PORT_BASE, VIRTIO_IRQ_BASE,
    VIRTIO_MMIO_START,
};
use crate::devices::legacy::{ConsoleTail, SerialConsole, SerialState, I8042};
use crate::devices::pseudo::GuestStatus;
use crate::snapshot::{
    self, short_hex, CpuIdentity, MachineState, MemoryBacking, MicrovmState, SavedDevice,
    SavedDeviceConfig, SnapshotError, MEMORY_FILE, STATE_FILE,
};
use crate::vmm::{AttachedDevices, AttachedVirtio, BootClock, ExitLatch, Vmm};
use crate::vstate::memory;
use crate::vstate::vcpu::{install_kick_handler, Buses, Vcpu};
use crate::vstate::vm::{realtime_ns, Vm};
use crate::{CpuTemplate, Error, THREAD_STACK};

/// The command line CRX boots with unless told otherwise: console on COM1 only, reset through
/// the i8042, reboot at once on panic, no PCI or ACPI probing.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet pci=off \
     8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd tsc=reliable no_timer_check";

/// Kernel parameters added to every guest's command line (before its init arguments).
pub const GUEST_KERNEL_ARGS_ENV: &str = "CRX_GUEST_KERNEL_ARGS";

/// Where setup installs the default guest (`vmlinux`, `initrd.cpio`); CRX_GUEST_DIR overrides it.
pub fn default_guest_dir() -> PathBuf {
    std::env::var_os("CRX_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/share/crx/guest"))
}

/// Where the guest console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// This process's stdout.
    #[default]
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Nowhere (the last 16 KiB are still kept for diagnosis).
    Discard,
}

/// Everything needed to boot one microVM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The full kernel command line (init arguments after ` -- `).
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u32,
    pub cpu_template: CpuTemplate,
    pub console: ConsoleOutput,
    /// virtio-mmio devices, in the order their windows and IRQs are assigned.
    pub devices: Vec<DeviceConfig>,
}

impl VmConfig {
    /// 1 vCPU, 128 MiB, the default command line, console on stdout.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            mem_mib: 128,
            cpu_template: CpuTemplate::default(),
            console: ConsoleOutput::default(),
            devices: Vec::new(),
        }
    }

    /// Appends init arguments (`-- ARG…`) to the command line, quoting arguments with spaces.
    pub fn with_init_args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        if !args.is_empty() {
            self.cmdline.push_str(" --");
            for arg in args {
                let arg = arg.as_ref();
                if arg.contains(char::is_whitespace) {
                    self.cmdline.push_str(&format!(" \"{arg}\""));
                } else {
                    self.cmdline.push(' ');
                    self.cmdline.push_str(arg);
                }
            }
        }
        self
    }

    fn validate(&self) -> Result<(), Error> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "{} vCPUs requested; CRX supports 1 to {MAX_VCPUS}",
                self.vcpus
            )));
        }
        if self.mem_mib < 16 {
            return Err(Error::Config(format!(
                "{} MiB of memory requested; a guest needs at least 16",
                self.mem_mib
            )));
        }
        if self.devices.len() > MAX_VIRTIO_DEVICES {
            return Err(Error::Config(format!(
                "{} virtio devices requested; CRX supports up to {MAX_VIRTIO_DEVICES}",
                self.devices.len()
            )));
        }
        Ok(())
    }

    /// The command line the guest gets: `config.cmdline` with a `virtio_mmio.device=` entry per
    /// device, then the parameters of `CRX_GUEST_KERNEL_ARGS` (set for every guest of a host,
    /// e.g. by the test host), placed before the init arguments.
    fn kernel_cmdline(&self) -> String {
        let mut declared: String = (0..self.devices.len())
            .map(|i| {
                let (base, irq) = virtio_slot(i);
                format!(" virtio_mmio.device=4K@{base:#x}:{irq}")
            })
            .collect();
        if let Some(extra) = std::env::var(GUEST_KERNEL_ARGS_ENV)
            .ok()
            .filter(|a| !a.trim().is_empty())
        {
            declared.push(' ');
            declared.push_str(extra.trim());
        }
        match self.cmdline.find(" -- ") {
            Some(split) => format!(
                "{}{declared}{}",
                &self.cmdline[..split],
                &self.cmdline[split..]
            ),
            None if self.cmdline.ends_with(" --") => {
                let split = self.cmdline.len() - 3;
                format!("{}{declared} --", &self.cmdline[..split])
            }
            None => format!("{}{declared}", self.cmdline),
        }
    }
}

/// How to start a VM from a snapshot ([`restore_vm`]).
#[derive(Clone, Debug)]
pub struct RestoreConfig {
    /// The state file ([`snapshot::STATE_FILE`] in the snapshot's directory).
    pub state: PathBuf,
    /// The memory file ([`snapshot::MEMORY_FILE`]); it must stay in place while the VM runs when
    /// mapped privately.
    pub memory: PathBuf,
    pub memory_backing: MemoryBacking,
    pub console: ConsoleOutput,
    /// The devices to attach instead of the snapshot's: the same kinds in the same order, each
    /// with its own backend (vsock CID and socket, tap and MAC, disk image of the same size and
    /// content). `None` reopens the snapshot's own (which only one VM at a time can use, and
    /// which a tap passed by fd cannot be).
    pub devices: Option<Vec<DeviceConfig>>,
}

impl RestoreConfig {
    /// The snapshot in `dir`, RAM mapped privately, console discarded, its own devices.
    pub fn new(dir: &Path) -> Self {
        RestoreConfig {
            state: dir.join(STATE_FILE),
            memory: dir.join(MEMORY_FILE),
            memory_backing: MemoryBacking::default(),
            console: ConsoleOutput::Discard,
            devices: None,
        }
    }
}

/// The devices a restore attaches: the overrides if given (checked against the snapshot's,
/// kind by kind), else the snapshot's own.
fn restore_devices(
    saved: &[SavedDevice],
    given: Option<&[DeviceConfig]>,
) -> Result<Vec<DeviceConfig>, SnapshotError> {
    let Some(given) = given else {
        return saved
            .iter()
            .enumerate()
            .map(|(index, device)| match &device.config {
                SavedDeviceConfig::Net(NetConfig {
                    tap: TapSource::Fd(_),
                    ..
                }) => Err(SnapshotError::TapByFd { index }),
                config => Ok(config.to_config()),
            })
            .collect();
    };
    if given.len() != saved.len() {
        return Err(SnapshotError::DeviceCount {
            saved: saved.len(),
            given: given.len(),
        });
    }
    for (index, (device, config)) in saved.iter().zip(given).enumerate() {
        let config = SavedDeviceConfig::of(config);
        if config.kind() != device.config.kind() {
            return Err(SnapshotError::DeviceKind {
                index,
                saved: device.config.kind(),
                given: config.kind(),
            });
        }
    }
    Ok(given.to_vec())
}

/// The most virtio devices: one IOAPIC pin each, from VIRTIO_IRQ_BASE to the last pin.
const MAX_VIRTIO_DEVICES: usize = (IRQ_MAX as u32 - VIRTIO_IRQ_BASE + 1) as usize;

/// The MMIO window and IRQ of the `index`th virtio device.
fn virtio_slot(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW,
        VIRTIO_IRQ_BASE + index as u32,
    )
}

fn console_sink(console: &ConsoleOutput) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match console {
        ConsoleOutput::Stdout => Box::new(std::io::stdout()),
        ConsoleOutput::Discard => Box::new(std::io::sink()),
        ConsoleOutput::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(Error::Console)?,
        ),
    })
}

/// Builds and starts the VM described by `config`, timing boot from now.
pub fn start_vm(config: &VmConfig) -> Result<Vmm, Error> {
    start_vm_at(config, Instant::now())
}

/// Builds and starts the VM, timing boot from `launch` (e.g. the process start).
pub fn start_vm_at(config: &VmConfig, launch: Instant) -> Result<Vmm, Error> {
    config.validate()?;
    let step = |name: &str| tracing::debug!("{name} at {:?}", launch.elapsed());
    install_kick_handler()?;
    let cmdline = config.kernel_cmdline();
    let guest_memory = memory::create(u64::from(config.mem_mib) << 20)?;

    // The guest image loads, and KVM is set up, on threads of their own while this one builds
    // the devices (a virtio-fs device waits for the virtiofsd it starts): reading the kernel and
    // starting virtiofsd are the largest single costs of a launch. The devices are built here
    // because virtiofsd dies with the thread that started it (PR_SET_PDEATHSIG).
    let (kvm_side, image, devices) = std::thread::scope(|scope| {
        let loader = spawn_helper(scope, "crx-loader", || {
            load_guest_image(&guest_memory, config, &cmdline)
        });
        let kvm_side = spawn_helper(scope, "crx-kvm-setup", || create_vm(&guest_memory));
        let devices = build_devices(&config.devices);
        let kvm_side = join_helper(kvm_side);
        step("VM created");
        (kvm_side, join_helper(loader), devices)
    });
    let (vm, boot_vcpu) = kvm_side?;
    let (kernel, cmdline_size, initrd) = image?;
    let devices = devices?;
    step("guest image loaded");
    boot::write_boot_params(&guest_memory, &kernel, cmdline_size, initrd)?;
    mptable::write(&guest_memory, config.vcpus).map_err(|e| Error::Boot {
        step: "write MP table",
        detail: e.to_string(),
    })?;

    let exit = Arc::new(ExitLatch::default());
    let clock = Arc::new(BootClock::new(launch));
    let console_tail = ConsoleTail::default();
    let (mut buses, serial) = attach_legacy_devices(
        &vm,
        &config.console,
        &exit,
        &clock,
        console_tail.clone(),
        None,
    )?;
    let virtio = attach_virtio_devices(&vm, &mut buses, &guest_memory, &devices, None)?;

    let mut template_cpuid = vm.supported_cpuid().clone();
    cpuid::apply_template(&mut template_cpuid, config.cpu_template);
    let mut vcpus = vec![boot_vcpu];
    for index in 1..config.vcpus {
        vcpus.push(Vcpu::new(&vm, index)?);
    }
    for vcpu in &vcpus {
        vcpu.configure(&template_cpuid, config.vcpus, &guest_memory, &kernel)?;
    }
    step("vCPUs configured");
    tracing::debug!(
        "booting {} ({:?} entry at {:#x}) with {} vCPUs, {} MiB",
        config.kernel.display(),
        kernel.mode,
        kernel.entry,
        config.vcpus,
        config.mem_mib
    );
    let parts = VmParts {
        exit,
        clock,
        console_tail,
        devices: AttachedDevices { serial, virtio },
        machine: MachineState {
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
            cmdline,
        },
        cpu: CpuIdentity {
            template: config.cpu_template,
            fingerprint: cpuid::fingerprint(&template_cpuid, config.vcpus),
        },
        memory_is_memfd: true,
        page_loader: None,
        vm,
        guest_memory,
    };
    parts.run(vcpus, devices, buses)
}

/// Restores the VM a snapshot describes and starts it, timing from now.
pub fn restore_vm(config: &RestoreConfig) -> Result<Vmm, Error> {
    restore_vm_at(config, Instant::now())
}

/// Restores and starts the VM, timing from `launch`: its boot clock's first instruction is the
/// restored vCPU 0's first KVM_RUN, and guest init is a boot timer write after the restore (a
/// guest may write it again to say it runs). Every check on the state file (truncation,
/// corruption, version, CPU, shape, devices) happens before the VM is built.
pub fn restore_vm_at(config: &RestoreConfig, launch: Instant) -> Result<Vmm, Error> {
    install_kick_handler()?;
    let (cpu, state) = snapshot::read_state_file(&config.state)?;
    let machine = &state.machine;
    if machine.vcpus == 0
        || machine.vcpus > MAX_VCPUS
        || state.vcpus.len() != usize::from(machine.vcpus)
        || state
            .vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| usize::from(v.index) != i)
        || machine.mem_mib < 16
        || state.devices.len() > MAX_VIRTIO_DEVICES
    {
        return Err(SnapshotError::Inconsistent(format!(
            "{} vCPUs ({} saved), {} MiB, {} devices",
            machine.vcpus,
            state.vcpus.len(),
            machine.mem_mib,
            state.devices.len()
        ))
        .into());
    }
    let device_configs = restore_devices(&state.devices, config.devices.as_deref())?;
    if !config.memory_backing.is_shareable() {
        if let Some(index) = device_configs
            .iter()
            .position(|d| matches!(d, DeviceConfig::Fs(_)))
        {
            return Err(SnapshotError::VirtioFsNeedsMemfd { index }.into());
        }
    }

    // KVM and the memory are restored on a thread of their own while this one builds the
    // devices (a virtio-fs device waits for the virtiofsd it starts, which dies with the thread
    // that started it).
    let (restored, devices) = std::thread::scope(|scope| {
        let restored = spawn_helper(scope, "crx-kvm-setup", || {
            restore_machine(config, &cpu, &state)
        });
        let devices = build_devices(&device_configs);
        (join_helper(restored), devices)
    });
    let (vm, vcpus, guest_memory, page_loader) = restored?;
    let devices = devices?;
    let exit = Arc::new(ExitLatch::default());
    let clock = Arc::new(BootClock::new(launch));
    let console_tail = ConsoleTail::default();
    let (mut buses, serial) = attach_legacy_devices(
        &vm,
        &config.console,
        &exit,
        &clock,
        console_tail.clone(),
        Some(&state.serial),
    )?;
    let virtio = attach_virtio_devices(
        &vm,
        &mut buses,
        &guest_memory,
        &devices,
        Some(&state.devices),
    )?;

    // The guest's clocks move on by the time the snapshot waited: measured last, just before
    // the vCPUs run.
    let elapsed_ns = realtime_ns().saturating_sub(state.vm.realtime_ns);
    for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
        vcpu.restore_state(saved, elapsed_ns)?;
    }
    vm.restore_clock(&state.vm, elapsed_ns)?;
    tracing::debug!(
        "restored {} vCPUs, {} MiB, {} devices; guest clock advanced {} ms",
        machine.vcpus,
        machine.mem_mib,
        devices.len(),
        elapsed_ns / 1_000_000
    );
    let parts = VmParts {
        exit,
        clock,
        console_tail,
        devices: AttachedDevices { serial, virtio },
        machine: state.machine,
        cpu,
        // A lazily filled memfd's holes are pages not loaded yet, not zeros.
        memory_is_memfd: config.memory_backing == MemoryBacking::Memfd,
        vm,
        guest_memory,
        page_loader,
    };
    parts.run(vcpus, devices, buses)
}

/// A VM's devices, each with the configuration it was built from.
type BuiltDevices = Vec<(DeviceConfig, Arc<Mutex<dyn VirtioDevice>>)>;

/// Builds `configs`' devices, in order.
fn build_devices(configs: &[DeviceConfig]) -> Result<BuiltDevices, Error> {
    configs
        .iter()
        .map(|c| Ok((c.clone(), c.build()?)))
        .collect()
}

/// A launch helper thread of `scope` running `work`, named `name`; see [`join_helper`].
fn spawn_helper<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    name: &str,
    work: impl FnOnce() -> Result<T, Error> + Send + 'scope,
) -> std::io::Result<std::thread::ScopedJoinHandle<'scope, Result<T, Error>>> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(THREAD_STACK)
        .spawn_scoped(scope, work)
}

/// What a launch helper thread returned (its panic goes on here); an error if it never started.
fn join_helper<T>(
    helper: std::io::Result<std::thread::ScopedJoinHandle<'_, Result<T, Error>>>,
) -> Result<T, Error> {
    match helper {
        Ok(helper) => helper
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        Err(e) => Err(Error::HelperThread(e)),
    }
}

/// The KVM side of a restore: the VM (checked to run on the CPU the snapshot was taken
/// with), its irqchip and vCPUs, and the guest memory, registered, with the VM-wide state.
fn restore_machine(
    config: &RestoreConfig,
    cpu: &CpuIdentity,
    state: &MicrovmState,
) -> Result<
    (
        Vm,
        Vec<Vcpu>,
        vm_memory::GuestMemoryMmap,
        Option<snapshot::lazy::PageLoader>,
    ),
    Error,
> {
    let machine = &state.machine;
    let kvm = Kvm::new().map_err(Error::KvmOpen)?;
    let vm = Vm::new(&kvm)?;
    let mut template_cpuid = vm.supported_cpuid().clone();
    cpuid::apply_template(&mut template_cpuid, cpu.template);
    let here = cpuid::fingerprint(&template_cpuid, machine.vcpus);
    if here != cpu.fingerprint {
        return Err(SnapshotError::CpuMismatch {
            template: cpu.template,
            saved: short_hex(&cpu.fingerprint),
            here: short_hex(&here),
        }
        .into());
    }
    vm.create_irqchip_and_pit()?;
    let vcpus = (0..machine.vcpus)
        .map(|index| Vcpu::new(&vm, index))
        .collect::<Result<Vec<_>, _>>()?;
    if crx_kvm_probe::vcpu_is_pvm(vcpus[0].fd()) {
        return Err(Error::PvmHost);
    }
    let snapshot::RestoredMemory {
        memory: guest_memory,
        loader: page_loader,
    } = snapshot::memory::restore(
        &config.memory,
        u64::from(machine.mem_mib) << 20,
        config.memory_backing,
    )?;
    vm.register_memory(&guest_memory)?;
    vm.restore_state(&state.vm)?;
    Ok((vm, vcpus, guest_memory, page_loader))
}

/// A built VM about to run.
struct VmParts {
    exit: Arc<ExitLatch>,
    clock: Arc<BootClock>,
    console_tail: ConsoleTail,
    devices: AttachedDevices,
    machine: MachineState,
    cpu: CpuIdentity,
    memory_is_memfd: bool,
    vm: Vm,
    guest_memory: vm_memory::GuestMemoryMmap,
    page_loader: Option<snapshot::lazy::PageLoader>,
}

impl VmParts {
    /// Starts the device event loop and one thread per vCPU.
    fn run(self, vcpus: Vec<Vcpu>, devices: BuiltDevices, buses: Buses) -> Result<Vmm, Error> {
        let device_loop = if devices.is_empty() {
            None
        } else {
            Some(EventLoop::start(
                devices.into_iter().map(|(_, d)| d).collect(),
            )?)
        };
        let buses = Arc::new(buses);
        let mut vmm = Vmm {
            vcpus: Vec::with_capacity(vcpus.len()),
            vcpu_checks: None,
            exit: self.exit.clone(),
            clock: self.clock.clone(),
            console_tail: self.console_tail,
            device_loop,
            devices: self.devices,
            machine: self.machine,
            cpu: self.cpu,
            paused: Mutex::new(false),
            memory_is_memfd: self.memory_is_memfd,
            vm: self.vm,
            guest_memory: self.guest_memory,
            _page_loader: self.page_loader,
        };
        for vcpu in vcpus {
            // On a failed spawn, dropping `vmm` stops the threads already started.
            let handle = vcpu.start(
                buses.clone(),
                self.exit.clone(),
                self.clock.clone(),
                vmm.guest_memory.clone(),
            )?;
            vmm.vcpus.push(handle);
        }
        vmm.start_vcpu_checks()?;
        Ok(vmm)
    }
}

/// The KVM VM with its irqchip and PIT, the boot vCPU, and `guest_memory` registered. The boot
/// vCPU comes early: it tells a PVM host apart before any more work is wasted.
fn create_vm(guest_memory: &vm_memory::GuestMemoryMmap) -> Result<(Vm, Vcpu), Error> {
    let kvm = Kvm::new().map_err(Error::KvmOpen)?;
    let vm = Vm::new(&kvm)?;
    // KVM takes the irqchip only before the first vCPU.
    vm.create_irqchip_and_pit()?;
    let boot_vcpu = Vcpu::new(&vm, 0)?;
    if crx_kvm_probe::vcpu_is_pvm(boot_vcpu.fd()) {
        return Err(Error::PvmHost);
    }
    vm.register_memory(guest_memory)?;
    Ok((vm, boot_vcpu))
}

/// Loads the kernel, the command line and the initrd into guest memory.
fn load_guest_image(
    guest_memory: &vm_memory::GuestMemoryMmap,
    config: &VmConfig,
    cmdline: &str,
) -> Result<(boot::LoadedKernel, usize, Option<boot::InitrdRegion>), Error> {
    let kernel = boot::load_kernel(guest_memory, &config.kernel)?;
    let cmdline = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)?;
    load_cmdline(guest_memory, GuestAddress(CMDLINE_START), &cmdline).map_err(|e| Error::Boot {
        step: "write command line",
        detail: e.to_string(),
    })?;
    let cmdline_size = cmdline.as_cstring()?.as_bytes_with_nul().len();
    let initrd = config
        .initrd
        .as_deref()
        .map(|path| boot::load_initrd(guest_memory, path, kernel.end))
        .transpose()?;
    Ok((kernel, cmdline_size, initrd))
}

/// The legacy devices: COM1 (irqfd on IRQ 4; in its saved state when restoring), the i8042, the
/// guest status page.
fn attach_legacy_devices(
    vm: &Vm,
    console: &ConsoleOutput,
    exit: &Arc<ExitLatch>,
    clock: &Arc<BootClock>,
    console_tail: ConsoleTail,
    saved_serial: Option<&SerialState>,
) -> Result<(Buses, Arc<Mutex<SerialConsole>>), Error> {
    let bus_err = |e: crate::devices::bus::Overlap| Error::Boot {
        step: "place devices",
        detail: e.to_string(),
    };
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.fd()
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|source| Error::Vm {
            step: "KVM_IRQFD (serial)",
            source,
        })?;
    let sink = console_sink(console)?;
    let serial = Arc::new(Mutex::new(match saved_serial {
        None => SerialConsole::new(serial_irq, sink, console_tail),
        Some(state) => SerialConsole::from_state(state, serial_irq, sink, console_tail)?,
    }));

    let mut buses = Buses::default();
    buses
        .pio
        .insert(u64::from(SERIAL_PORT_BASE), 8, serial.clone())
        .map_err(bus_err)?;
    buses
        .pio
        .insert(
            u64::from(I8042_DATA_PORT),
            5,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )
        .map_err(bus_err)?;
    buses
        .mmio
        .insert(
            GUEST_STATUS_START,
            MMIO_PAGE_SIZE,
            Arc::new(Mutex::new(GuestStatus::new(clock.clone(), exit.clone()))),
        )
        .map_err(bus_err)?;
    Ok((buses, serial))
}

/// Each virtio device gets a 4 KiB MMIO window, an IOAPIC pin driven through an irqfd, and one
/// ioeventfd per queue on its QueueNotify register (matching the queue index), so neither
/// notifications nor interrupts pass through a vCPU thread's exit handling. When restoring, each
/// window takes its saved state (`saved`, in the same order).
fn attach_virtio_devices(
    vm: &Vm,
    buses: &mut Buses,
    guest_memory: &vm_memory::GuestMemoryMmap,
    devices: &[(DeviceConfig, Arc<Mutex<dyn VirtioDevice>>)],
    saved: Option<&[SavedDevice]>,
) -> Result<Vec<AttachedVirtio>, Error> {
    let mut attached = Vec::with_capacity(devices.len());
    for (index, (config, device)) in devices.iter().enumerate() {
        let (base, irq) = virtio_slot(index);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.fd()
            .register_irqfd(&irqfd, irq)
            .map_err(|source| Error::Vm {
                step: "KVM_IRQFD (virtio)",
                source,
            })?;
        {
            let device = device.lock().unwrap_or_else(|p| p.into_inner());
            for (queue, event) in device.queue_events().iter().enumerate() {
                vm.fd()
                    .register_ioevent(
                        event,
                        &IoEventAddress::Mmio(base + QUEUE_NOTIFY),
                        queue as u32,
                    )
                    .map_err(|source| Error::Vm {
                        step: "KVM_IOEVENTFD (virtio queue notify)",
                        source,
                    })?;
            }
        }
        let interrupt = Arc::new(Interrupt::new(irqfd));
        let transport = match saved.and_then(|saved| saved.get(index)) {
            None => MmioTransport::new(device.clone(), guest_memory.clone(), interrupt),
            Some(saved) => MmioTransport::restore(
                device.clone(),
                guest_memory.clone(),
                interrupt,
                &saved.state,
            )
            .map_err(|source| SnapshotError::Device { index, source })?,
        };
        let transport = Arc::new(Mutex::new(transport));
        buses
            .mmio
            .insert(base, MMIO_WINDOW, transport.clone())
            .map_err(|e| Error::Boot {
                step: "place virtio devices",
                detail: e.to_string(),
            })?;
        attached.push(AttachedVirtio {
            config: config.clone(),
            transport,
        });
    }
    Ok(attached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_args_follow_a_double_dash_and_keep_spaces_quoted() {
        let c = VmConfig::new("/k").with_init_args(&["/bin/sh", "-c", "exit 3"]);
        assert!(
            c.cmdline.ends_with(" -- /bin/sh -c \"exit 3\""),
            "{}",
            c.cmdline
        );
        assert_eq!(
            VmConfig::new("/k").with_init_args::<&str>(&[]).cmdline,
            DEFAULT_CMDLINE
        );
    }

    #[test]
    fn virtio_devices_are_declared_before_the_init_arguments() {
        let mut c = VmConfig::new("/k").with_init_args(&["/bin/true"]);
        c.devices = vec![DeviceConfig::Rng, DeviceConfig::Rng];
        let line = c.kernel_cmdline();
        assert!(
            line.ends_with(" virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 -- /bin/true"),
            "{line}"
        );
        c.cmdline = "console=ttyS0".into();
        assert_eq!(
            c.kernel_cmdline(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn impossible_shapes_are_refused_before_kvm_is_touched() {
        let mut c = VmConfig::new("/k");
        c.vcpus = 0;
        assert!(matches!(start_vm(&c), Err(Error::Config(_))));
        c.vcpus = MAX_VCPUS + 1;
        assert!(matches!(start_vm(&c), Err(Error::Config(_))));
        c.vcpus = 1;
        c.mem_mib = 1;
        assert!(matches!(start_vm(&c), Err(Error::Config(_))));
    }
}
