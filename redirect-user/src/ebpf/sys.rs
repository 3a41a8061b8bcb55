//! The few `bpf()` commands redirect issues itself, because aya 0.14 does
//! not expose them for every hook it needs:
//!
//! - `BPF_LINK_CREATE` + `BPF_OBJ_PIN`: aya cannot turn a `CgroupSockopt`
//!   link into a pinnable `FdLink`, so every hook is attached here, one way
//!   for all (see `loader::attach`);
//! - `BPF_OBJ_GET`: opening a pinned link as a descriptor;
//! - `BPF_LINK_UPDATE`: replacing a link's program in place (the no-gap reinstall);
//! - `BPF_LINK_DETACH`: force-detaching a link;
//! - `BPF_OBJ_GET_INFO_BY_FD`: reading a cgroup link's program and target;
//! - `BPF_MAP_LOOKUP_BATCH`: reading a whole array in one call (a node
//!   set's pod records, read on every pod's add, where the set's records
//!   are not memory-mapped: see [`array_values_where`]);
//! - `BPF_MAP_CREATE`: asking whether the kernel has socket storage without
//!   creating (and, slowly, freeing) one (see [`probe_sk_storage_map`]), and
//!   a map whose flags aya cannot set (see [`create_array`]).

use std::{
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};

const BPF_MAP_CREATE: u32 = 0;
const BPF_PROG_LOAD: u32 = 5;
const BPF_OBJ_PIN: u32 = 6;
const BPF_OBJ_GET: u32 = 7;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_LINK_CREATE: u32 = 28;
const BPF_LINK_UPDATE: u32 = 29;
const BPF_LINK_DETACH: u32 = 34;
const BPF_MAP_LOOKUP_BATCH: u32 = 24;

fn bpf<T>(cmd: u32, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: attr is an initialised prefix of `union bpf_attr` for `cmd`,
    // and the size passed is its size.
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

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Attaches a program to a cgroup (kernel >= 5.7) or, for sk_lookup, a
/// network namespace (>= 5.9) with a new bpf_link (`BPF_LINK_CREATE`). No
/// flags: these links always share the hook with other programs, the
/// opposite of the exclusive legacy attach.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> std::io::Result<OwnedFd> {
    link_create_on(prog, target.as_raw_fd() as u32, attach_type)
}

/// Attaches a tc program to interface `ifindex` of the calling thread's
/// network namespace with a TCX link (kernel >= 6.6), after the
/// interface's other programs.
pub fn link_create_ifindex(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
) -> std::io::Result<OwnedFd> {
    link_create_on(prog, ifindex, attach_type)
}

/// `BPF_LINK_CREATE` with `target` (a descriptor, or an interface index:
/// the same field of `bpf_attr`).
fn link_create_on(prog: BorrowedFd<'_>, target: u32, attach_type: u32) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    let mut attr = Attr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target,
        attach_type,
        flags: 0,
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// The `bpf_attr` of `BPF_OBJ_PIN` and `BPF_OBJ_GET`.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `BPF_OBJ_PIN` or `BPF_OBJ_GET` on `path` (`fd`: the object to pin, 0 to get).
fn obj_call(cmd: u32, fd: u32, path: &Path) -> Result<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd,
        file_flags: 0,
    };
    Ok(bpf(cmd, &mut attr)?)
}

/// Pins an object at `path` on bpffs (`BPF_OBJ_PIN`).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    obj_call(BPF_OBJ_PIN, fd.as_raw_fd() as u32, path)
        .with_context(|| format!("BPF_OBJ_PIN {}", path.display()))?;
    Ok(())
}

/// Opens a pinned object (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let fd = obj_call(BPF_OBJ_GET, 0, path)
        .with_context(|| format!("BPF_OBJ_GET {}", path.display()))?;
    Ok(owned(fd))
}

/// Replaces the program of a link in one step: the hook never runs without
/// a program (`BPF_LINK_UPDATE`, kernel >= 5.7).
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).context("BPF_LINK_UPDATE")?;
    Ok(())
}

/// Detaches a link now, even if other descriptors of it are still open
/// (`BPF_LINK_DETACH`, kernel >= 5.9; older kernels detach on last close).
pub fn link_detach(link: BorrowedFd<'_>) -> std::io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// The elements of the array map `map` of `len` entries that `keep`
/// accepts, with their indexes (`V` must be the map's value type): read in
/// place through a read-only mapping of the map when it is
/// memory-mappable (`BPF_F_MMAPABLE`, kernel 5.5; a node set's pod records
/// from this release on), else in one `BPF_MAP_LOOKUP_BATCH` (kernel 5.6;
/// a set an earlier release loaded). The batch costs about 0.3 µs an
/// element whatever its size (75 µs for 256 records, measured); the
/// mapping a few microseconds, and only kept elements are copied out.
pub fn array_values_where<V: aya::Pod>(
    map: BorrowedFd<'_>,
    len: u32,
    keep: impl Fn(&V) -> bool,
) -> std::io::Result<Vec<(u32, V)>> {
    // Any failure to map (EINVAL: the map is not mappable) leaves the
    // answer to the batch, whose error is the one reported.
    mapped_array_values(map, len, &keep).or_else(|_| {
        Ok((0..)
            .zip(batch_array_values(map, len)?)
            .filter(|(_, value)| keep(value))
            .collect())
    })
}

/// An array map's value area mapped read-only, unmapped on drop.
struct MappedArray {
    addr: *mut libc::c_void,
    len: usize,
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping this value owns, unmapped once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// [`array_values_where`] through a mapping: the kernel lays a mappable
/// array's values out from the mapping's start, each rounded up to 8
/// bytes.
fn mapped_array_values<V: aya::Pod>(
    map: BorrowedFd<'_>,
    len: u32,
    keep: &impl Fn(&V) -> bool,
) -> std::io::Result<Vec<(u32, V)>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let stride = size_of::<V>().next_multiple_of(8);
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .map_err(|_| std::io::Error::other("no page size"))?;
    let bytes = (len as usize * stride).next_multiple_of(page);
    // SAFETY: a new read-only shared mapping of the map's descriptor; the
    // kernel refuses (EINVAL) a map that is not mappable or a length past
    // its values.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ,
            libc::MAP_SHARED,
            map.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let mapped = MappedArray { addr, len: bytes };
    Ok((0..len)
        .map(|i| {
            // SAFETY: value i lies at i * stride, inside the mapping (len
            // values of `stride` bytes were mapped); V is plain data.
            let value = unsafe {
                std::ptr::read_unaligned(
                    mapped
                        .addr
                        .cast::<u8>()
                        .add(i as usize * stride)
                        .cast::<V>(),
                )
            };
            (i, value)
        })
        .filter(|(_, value)| keep(value))
        .collect())
}

/// Every element of the array map `map` of `len` entries in one
/// `BPF_MAP_LOOKUP_BATCH`: the kernel writes `len` values of the map's
/// value size.
fn batch_array_values<V: aya::Pod>(map: BorrowedFd<'_>, len: u32) -> std::io::Result<Vec<V>> {
    #[repr(C)]
    struct Attr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let mut keys = vec![0u32; len as usize];
    let mut values: Vec<std::mem::MaybeUninit<V>> = Vec::with_capacity(len as usize);
    let mut out_batch = 0u32;
    let mut attr = Attr {
        in_batch: 0,
        out_batch: std::ptr::from_mut(&mut out_batch) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: len,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        // ENOENT: the array ended before `count` (it is shorter than `len`).
        Ok(_) => {}
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
        Err(err) => return Err(err),
    }
    let got = attr.count.min(len) as usize;
    // SAFETY: the kernel wrote `got` values of V's size (V is the map's
    // value type, plain data) into the buffer's first `got` slots.
    unsafe { values.set_len(got) };
    Ok(values
        .into_iter()
        // SAFETY: initialised above.
        .map(|v| unsafe { v.assume_init() })
        .collect())
}

/// A descriptor of a loaded program, by id.
pub fn prog_fd_by_id(id: u32) -> Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = Attr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    Ok(owned(
        bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).with_context(|| format!("opening program {id}"))?,
    ))
}

/// What the kernel reports about a cgroup or network namespace link.
#[derive(Clone, Copy, Debug)]
pub struct LinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// What the link is attached to: the cgroup id for a cgroup link, the
    /// namespace's inode number for a netns link, the interface index for
    /// a TCX link. 0 once the cgroup, namespace or interface is gone (the
    /// link is then defunct).
    pub target: u64,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a cgroup or netns link.
pub fn link_info(link: BorrowedFd<'_>) -> Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8
    // whose cgroup member starts with the u64 cgroup_id, and whose netns
    // member with the u32 netns_ino (then the u32 attach type), and whose
    // tcx member with the u32 ifindex.
    let mut info = [0u64; 16];
    obj_info(link, &mut info).context("BPF_OBJ_GET_INFO_BY_FD on a link")?;
    const BPF_LINK_TYPE_NETNS: u64 = 5;
    const BPF_LINK_TYPE_TCX: u64 = 11;
    let one_word = matches!(
        info[0] & 0xffff_ffff,
        BPF_LINK_TYPE_NETNS | BPF_LINK_TYPE_TCX
    );
    Ok(LinkInfo {
        link_id: (info[0] >> 32) as u32,
        prog_id: info[1] as u32,
        target: if one_word {
            info[2] & 0xffff_ffff
        } else {
            info[2]
        },
    })
}

/// The id of the program `prog` (struct bpf_prog_info starts with its
/// type, then its id).
pub fn prog_id(prog: BorrowedFd<'_>) -> Result<u32> {
    let mut info = [0u32; 2];
    obj_info(prog, &mut info).context("BPF_OBJ_GET_INFO_BY_FD on a program")?;
    Ok(info[1])
}

/// `BPF_OBJ_GET_INFO_BY_FD`: the first `size_of::<T>()` bytes of the info
/// struct of the object `fd` into `info`.
fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> std::io::Result<()> {
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = Attr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: std::ptr::from_mut(info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

/// Whether the kernel loads a program of `prog_type` for the hook
/// `attach_type` (a two-instruction program that allows everything): the
/// exact test of "this kernel has this hook", as opposed to its version.
pub fn probe_hook(prog_type: u32, attach_type: u32) -> std::io::Result<()> {
    // r0 = 1; exit
    probe_program(
        prog_type,
        attach_type,
        &[0x0000_0001_0000_00b7, 0x0000_0000_0000_0095],
    )
}

/// Whether sk_lookup programs (`prog_type`, `attach_type`) may read
/// `ingress_ifindex` (kernel 5.17): the kernel loads one that does.
pub fn probe_sk_lookup_ifindex(prog_type: u32, attach_type: u32) -> std::io::Result<()> {
    // r0 = *(u32 *)(r1 + 64) (struct bpf_sk_lookup's ingress_ifindex);
    // r0 = 1; exit
    probe_program(
        prog_type,
        attach_type,
        &[
            0x0000_0000_0040_1061,
            0x0000_0001_0000_00b7,
            0x0000_0000_0000_0095,
        ],
    )
}

/// Whether the kernel has the TCX hook `attach_type` (kernel 6.6): it
/// refuses a link of a tc program to interface 0 as a missing device
/// (`ENODEV`), where a kernel without TCX refuses the attach type itself
/// (`EINVAL`). Nothing is attached.
pub fn probe_tcx(prog_type: u32, attach_type: u32) -> std::io::Result<()> {
    // r0 = -1 (TC_ACT_UNSPEC); exit
    let prog = load_program(
        prog_type,
        attach_type,
        &[0xffff_ffff_0000_00b7, 0x0000_0000_0000_0095],
    )?;
    match link_create_ifindex(prog.as_fd(), 0, attach_type) {
        Err(err) if err.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        Err(err) => Err(err),
        Ok(_) => Err(std::io::Error::other(
            "a TCX link to interface 0 was created",
        )),
    }
}

/// `BPF_F_MMAPABLE`: an array whose values user space can map (kernel 5.5).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The `BPF_MAP_CREATE` part of `union bpf_attr` this module fills: every
/// field up to `btf_value_type_id` exists from kernel 4.18.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
}

/// Creates an array map named `name` of `entries` values of `value_size`
/// bytes with `flags`: a map of user space's own, which the programs never
/// name (aya 0.14 cannot set the flags of a map the object declares).
pub fn create_array(
    name: &str,
    value_size: u32,
    entries: u32,
    flags: u32,
) -> std::io::Result<OwnedFd> {
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let mut map_name = [0u8; 16];
    for (to, from) in map_name[..15].iter_mut().zip(name.bytes()) {
        *to = from;
    }
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size,
        max_entries: entries,
        map_flags: flags,
        map_name,
        ..MapCreateAttr::default()
    };
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

/// Whether the kernel has socket-storage maps (`BPF_MAP_TYPE_SK_STORAGE`,
/// kernel 5.2), asked so that nothing is allocated: a create whose only
/// fault is a value too large for socket storage fails with `E2BIG` in the
/// map type's own check, which runs before any allocation, where a kernel
/// without the type answers `EINVAL`. (Creating one that fails later, as
/// aya's probe does, makes the kernel free it synchronously, waiting for an
/// RCU grace period: 10-40 ms per install on a 2-core machine.) Every field
/// passed exists from kernel 4.18, so an `E2BIG` cannot be the kernel
/// refusing unknown fields.
pub fn probe_sk_storage_map() -> std::io::Result<()> {
    const BPF_MAP_TYPE_SK_STORAGE: u32 = 24;
    const BPF_F_NO_PREALLOC: u32 = 1;
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_SK_STORAGE,
        key_size: 4,
        value_size: u32::MAX,
        map_flags: BPF_F_NO_PREALLOC,
        btf_key_type_id: 1,
        btf_value_type_id: 1,
        ..MapCreateAttr::default()
    };
    match bpf(BPF_MAP_CREATE, &mut attr) {
        Err(err) if err.raw_os_error() == Some(libc::E2BIG) => Ok(()),
        Err(err) => Err(err),
        Ok(fd) => {
            drop(owned(fd));
            Err(std::io::Error::other(
                "the kernel created a socket-storage map of 4 GiB values",
            ))
        }
    }
}

/// Loads (and drops) a program of `insns`: whether the kernel accepts it.
fn probe_program(prog_type: u32, attach_type: u32, insns: &[u64]) -> std::io::Result<()> {
    load_program(prog_type, attach_type, insns).map(drop)
}

/// Loads a program of `insns`.
fn load_program(prog_type: u32, attach_type: u32, insns: &[u64]) -> std::io::Result<OwnedFd> {
    let license = c"GPL";
    #[repr(C)]
    struct Attr {
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
    let mut attr = Attr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: [0; 16],
        prog_ifindex: 0,
        expected_attach_type: attach_type,
    };
    bpf(BPF_PROG_LOAD, &mut attr).map(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value of an odd size, so that the mapping's 8-byte stride shows.
    type Value = [u8; 12];

    fn array(entries: u32, flags: u32) -> std::io::Result<OwnedFd> {
        create_array("test", size_of::<Value>() as u32, entries, flags)
    }

    /// Writes `value` at `key` through aya, as the node set's records are
    /// written.
    fn set(map: &OwnedFd, key: u32, value: &Value) {
        let fd = map.try_clone().expect("duplicating the map's descriptor");
        let data = aya::maps::MapData::from_fd(fd).expect("opening the map");
        let mut array: aya::maps::Array<_, Value> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("an array map");
        array.set(key, value, 0).expect("writing an element");
    }

    /// Pod records are read through a mapping when the set's map is
    /// mappable and through the batch when it is not (a set an earlier
    /// release loaded): both give every value, in order.
    #[test]
    fn array_values_are_the_same_mapped_or_batched() {
        let entries = 700; // more than a page of 12-byte values at stride 16
        let (mappable, plain) = match (array(entries, BPF_F_MMAPABLE), array(entries, 0)) {
            (Ok(m), Ok(p)) => (m, p),
            (Err(err), _) | (_, Err(err)) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "creating array maps: {err} (the unit tests run as root in CI)"
                );
                eprintln!("skipped: creating array maps needs CAP_BPF or root ({err})");
                return;
            }
        };
        let value = |i: u32| -> Value {
            let mut v = [0u8; 12];
            v[..4].copy_from_slice(&i.to_ne_bytes());
            v[8..].copy_from_slice(&(i * 7 + 1).to_ne_bytes());
            v
        };
        for i in (0..entries).step_by(3) {
            set(&mappable, i, &value(i));
            set(&plain, i, &value(i));
        }
        let expected: Vec<Value> = (0..entries)
            .map(|i| if i % 3 == 0 { value(i) } else { [0; 12] })
            .collect();
        let every = |_: &Value| true;
        let indexed = |values: Vec<Value>| -> Vec<(u32, Value)> { (0..).zip(values).collect() };
        let mapped = mapped_array_values(mappable.as_fd(), entries, &every)
            .expect("mapping a mappable array");
        assert_eq!(mapped, indexed(expected.clone()));
        assert!(
            mapped_array_values(plain.as_fd(), entries, &every).is_err(),
            "the kernel mapped an array created without BPF_F_MMAPABLE"
        );
        let set = |v: &Value| v[8..] != [0; 4];
        let wanted: Vec<(u32, Value)> = (0..entries).step_by(3).map(|i| (i, value(i))).collect();
        for map in [&plain, &mappable] {
            assert_eq!(
                array_values_where(map.as_fd(), entries, every).expect("reading"),
                indexed(expected.clone())
            );
            assert_eq!(
                array_values_where(map.as_fd(), entries, set).expect("reading"),
                wanted
            );
        }
        assert!(
            mapped_array_values(mappable.as_fd(), 0, &every)
                .expect("none")
                .is_empty()
        );
    }
}
