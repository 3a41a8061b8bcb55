//! A stand-in for another eBPF user of the same cgroup (Cilium, a security
//! agent...): an unrelated `cgroup/connect4` program that only counts the
//! connects it sees and allows them. Tests attach it next to redirect to
//! prove both keep running.
//!
//! It is eleven hand-written instructions loaded with the raw `bpf()` system
//! call, so that it shares nothing (object file, loader, maps) with redirect.

use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_PROG_LOAD: u32 = 5;
const BPF_PROG_ATTACH: u32 = 8;
const BPF_PROG_DETACH: u32 = 9;
const BPF_LINK_CREATE: u32 = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_F_ALLOW_MULTI: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// How the witness is attached to its cgroup.
enum Attachment {
    /// `BPF_PROG_ATTACH` with `BPF_F_ALLOW_MULTI`, owned by the cgroup.
    Legacy { cgroup: File },
    /// A bpf_link, detached when its descriptor closes.
    Link(#[allow(dead_code)] OwnedFd),
}

/// An attached witness program; detached on drop.
pub struct Witness {
    map: OwnedFd,
    prog: OwnedFd,
    attachment: Attachment,
}

fn bpf<T>(cmd: u32, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: attr is a valid, initialised bpf_attr prefix of the given size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as u32,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn fd(ret: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor to us.
    unsafe { OwnedFd::from_raw_fd(ret as i32) }
}

impl Witness {
    /// Attaches a witness the legacy way, as older agents do, sharing the
    /// hook with other programs (`BPF_F_ALLOW_MULTI`).
    pub fn attach_legacy_multi(cgroup: &Path) -> Result<Self> {
        Self::attach_legacy(cgroup, BPF_F_ALLOW_MULTI)
    }

    /// Attaches a witness the exclusive way (no flags): the kernel then
    /// refuses any other program on this hook of the cgroup.
    pub fn attach_exclusive(cgroup: &Path) -> Result<Self> {
        Self::attach_legacy(cgroup, 0)
    }

    fn attach_legacy(cgroup: &Path, flags: u32) -> Result<Self> {
        let (map, prog) = load()?;
        let cg = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        #[repr(C)]
        struct Attach {
            target_fd: u32,
            prog_fd: u32,
            attach_type: u32,
            flags: u32,
        }
        let mut attr = Attach {
            target_fd: cg.as_raw_fd() as u32,
            prog_fd: prog.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_INET4_CONNECT,
            flags,
        };
        bpf(BPF_PROG_ATTACH, &mut attr).context("BPF_PROG_ATTACH of the witness")?;
        Ok(Self {
            map,
            prog,
            attachment: Attachment::Legacy { cgroup: cg },
        })
    }

    /// Attaches a witness with a bpf_link, as current agents do.
    pub fn attach_link(cgroup: &Path) -> Result<Self> {
        let (map, prog) = load()?;
        let cg = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        #[repr(C)]
        struct LinkCreate {
            prog_fd: u32,
            target_fd: u32,
            attach_type: u32,
            flags: u32,
        }
        let mut attr = LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: cg.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_INET4_CONNECT,
            flags: 0,
        };
        let link = fd(bpf(BPF_LINK_CREATE, &mut attr).context("BPF_LINK_CREATE of the witness")?);
        Ok(Self {
            map,
            prog,
            attachment: Attachment::Link(link),
        })
    }

    /// How many connects the witness has seen.
    pub fn count(&self) -> Result<u64> {
        #[repr(C)]
        struct Lookup {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let key = 0u32;
        let mut value = 0u64;
        let mut attr = Lookup {
            map_fd: self.map.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_mut(&mut value) as u64,
            flags: 0,
        };
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("reading the witness counter")?;
        Ok(value)
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        if let Attachment::Legacy { cgroup } = &self.attachment {
            #[repr(C)]
            struct Detach {
                target_fd: u32,
                prog_fd: u32,
                attach_type: u32,
            }
            let mut attr = Detach {
                target_fd: cgroup.as_raw_fd() as u32,
                prog_fd: self.prog.as_raw_fd() as u32,
                attach_type: BPF_CGROUP_INET4_CONNECT,
            };
            let _ = bpf(BPF_PROG_DETACH, &mut attr);
        }
    }
}

/// Creates the counter map and loads the counting program.
fn load() -> Result<(OwnedFd, OwnedFd)> {
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit; failure only matters on old kernels, where
    // the map creation below then reports it.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    let mut attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 8,
        max_entries: 1,
    };
    let map = fd(bpf(BPF_MAP_CREATE, &mut attr).context("creating the witness map")?);
    let map_fd = map.as_raw_fd();
    let program = [
        insn(0x62, 10, 0, -4, 0),    // *(u32 *)(r10 - 4) = 0
        insn(0xbf, 2, 10, 0, 0),     // r2 = r10
        insn(0x07, 2, 0, 0, -4),     // r2 += -4
        insn(0x18, 1, 1, 0, map_fd), // r1 = map (ld_imm64, BPF_PSEUDO_MAP_FD)
        insn(0x00, 0, 0, 0, 0),      //   (second half of ld_imm64)
        insn(0x85, 0, 0, 0, 1),      // call bpf_map_lookup_elem
        insn(0x15, 0, 0, 2, 0),      // if r0 == 0 goto +2
        insn(0xb7, 1, 0, 0, 1),      // r1 = 1
        insn(0xdb, 0, 1, 0, 0),      // lock *(u64 *)(r0 + 0) += r1
        insn(0xb7, 0, 0, 0, 1),      // r0 = 1 (allow)
        insn(0x95, 0, 0, 0, 0),      // exit
    ];
    let license = c"GPL";
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let mut name = [0u8; 16];
    name[..7].copy_from_slice(b"witness");
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: BPF_CGROUP_INET4_CONNECT,
    };
    let prog = fd(bpf(BPF_PROG_LOAD, &mut attr).context("loading the witness program")?);
    Ok((map, prog))
}
