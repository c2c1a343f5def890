//! Direct boot: loads the kernel (ELF vmlinux or bzImage) and initrd into guest memory and writes
//! what the chosen entry protocol hands the kernel: the PVH `hvm_start_info` with its memory map
//! and module list, or the Linux zero page with its e820 table.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::regs::EntryMode;
use super::{
    CMDLINE_START, EBDA_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START,
    ZERO_PAGE_START,
};
use crate::Error;

/// Where and how the kernel was loaded.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: u64,
    pub mode: EntryMode,
    /// First guest address after the kernel image.
    pub end: u64,
    /// The bzImage's own setup header, to be completed in the zero page.
    pub setup_header: Option<setup_header>,
}

/// The initrd's place in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct InitrdRegion {
    pub addr: u64,
    pub size: u64,
}

/// Loads `path`: an ELF vmlinux (entered through PVH when it has the PVH note, else the 64-bit
/// protocol), or a bzImage (64-bit protocol).
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, Error> {
    let open = || {
        File::open(path).map_err(|source| Error::KernelOpen {
            path: path.to_path_buf(),
            source,
        })
    };
    let elf = match Elf::load(mem, None, &mut open()?, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => {
            let (entry, mode) = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (addr.raw_value(), EntryMode::Pvh),
                _ => (result.kernel_load.raw_value(), EntryMode::Linux64),
            };
            return Ok(LoadedKernel {
                entry,
                mode,
                end: result.kernel_end,
                setup_header: None,
            });
        }
        Err(e) => e,
    };
    match BzImage::load(mem, None, &mut open()?, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => Ok(LoadedKernel {
            // The 64-bit entry point sits 0x200 into the protected-mode kernel.
            entry: result.kernel_load.raw_value() + 0x200,
            mode: EntryMode::Linux64,
            end: result.kernel_end,
            setup_header: result.setup_header,
        }),
        Err(bzimage) => Err(Error::KernelFormat {
            path: path.to_path_buf(),
            elf,
            bzimage,
        }),
    }
}

/// The end of RAM below the MMIO gap (the first region's end).
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .unwrap_or(0)
}

/// Loads the initrd page-aligned at the top of low RAM, as Firecracker does, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<InitrdRegion, Error> {
    let open_err = |source| Error::InitrdOpen {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let top = low_ram_end(mem);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end && size > 0)
        .ok_or(Error::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| Error::Boot {
            step: "copy initrd into guest memory",
            detail: e.to_string(),
        })?;
    Ok(InitrdRegion { addr, size })
}

/// Memory map kinds shared by e820 and PVH.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The guest's memory map: low RAM below the EBDA, the BIOS hole, then every RAM region.
fn memory_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

fn boot_error(step: &'static str) -> impl Fn(linux_loader::configurator::Error) -> Error {
    move |e| Error::Boot {
        step,
        detail: e.to_string(),
    }
}

/// Writes the boot protocol's parameters for `kernel` (the command line is already at
/// `CMDLINE_START`, `cmdline_size` bytes with its NUL).
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_size: usize,
    initrd: Option<InitrdRegion>,
) -> Result<(), Error> {
    let map = memory_map(mem);
    match kernel.mode {
        EntryMode::Pvh => {
            let memmap: Vec<hvm_memmap_table_entry> = map
                .iter()
                .map(|&(addr, size, type_)| hvm_memmap_table_entry {
                    addr,
                    size,
                    type_,
                    reserved: 0,
                })
                .collect();
            let mut start_info = hvm_start_info {
                magic: 0x336e_c578, // XEN_HVM_START_MAGIC_VALUE
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: memmap.len() as u32,
                ..Default::default()
            };
            if initrd.is_some() {
                start_info.nr_modules = 1;
                start_info.modlist_paddr = PVH_MODLIST_START;
            }
            let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            if let Some(initrd) = initrd {
                let module = hvm_modlist_entry {
                    paddr: initrd.addr,
                    size: initrd.size,
                    ..Default::default()
                };
                params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
            }
            PvhBootConfigurator::write_bootparams(&params, mem)
                .map_err(boot_error("write PVH start info"))
        }
        EntryMode::Linux64 => {
            let mut zero_page = boot_params::default();
            if let Some(hdr) = kernel.setup_header {
                zero_page.hdr = hdr;
            } else {
                zero_page.hdr.boot_flag = 0xaa55;
                zero_page.hdr.header = 0x5372_6448; // "HdrS"
                zero_page.hdr.kernel_alignment = 0x0100_0000;
            }
            zero_page.hdr.type_of_loader = 0xff;
            zero_page.hdr.cmd_line_ptr = CMDLINE_START as u32;
            zero_page.hdr.cmdline_size = cmdline_size as u32;
            if let Some(initrd) = initrd {
                zero_page.hdr.ramdisk_image = initrd.addr as u32;
                zero_page.hdr.ramdisk_size = initrd.size as u32;
            }
            if map.len() > zero_page.e820_table.len() {
                return Err(Error::Boot {
                    step: "write e820 table",
                    detail: format!("{} entries", map.len()),
                });
            }
            for (slot, &(addr, size, type_)) in zero_page.e820_table.iter_mut().zip(&map) {
                slot.addr = addr;
                slot.size = size;
                slot.r#type = type_;
            }
            zero_page.e820_entries = map.len() as u8;
            let params = BootParams::new(&zero_page, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams(&params, mem)
                .map_err(boot_error("write zero page"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::{MMIO_GAP_END, MMIO_GAP_START};

    #[test]
    fn memory_map_skips_the_bios_hole_and_the_mmio_gap() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), 0x1000_0000),
        ])
        .unwrap();
        let map = memory_map(&mem);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(
            map[2],
            (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM)
        );
        assert_eq!(map[3], (MMIO_GAP_END, 0x1000_0000, E820_RAM));
    }

    #[test]
    fn a_file_that_is_no_kernel_is_refused_by_name() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x400_0000)]).unwrap();
        let dir = std::env::temp_dir().join(format!("crx-bad-kernel-{}", std::process::id()));
        std::fs::write(&dir, vec![0x5a; 8192]).unwrap();
        let err = load_kernel(&mem, &dir).unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(err, Error::KernelFormat { .. }), "{err}");
        let missing = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(missing, Error::KernelOpen { .. }), "{missing}");
    }
}
