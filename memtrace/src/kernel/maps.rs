//! Reading a whole BPF hash map while the programs keep changing it.
//!
//! Walking a hash map key by key (`BPF_MAP_GET_NEXT_KEY`) restarts from the first bucket
//! whenever the current key is deleted under it, so a map that a busy process churns is
//! read with entries counted two or three times. `BPF_MAP_LOOKUP_BATCH` (Linux 5.6) copies
//! one whole bucket at a time under the bucket's lock and moves on by bucket index, so an
//! entry that stays in the map for the whole read is returned exactly once.

use std::{
    collections::HashSet,
    hash::Hash,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `bpf_map_update_elem` flag: fail if the key exists.
pub const BPF_NOEXIST: u64 = 1;

/// `union bpf_attr` as the batch commands read it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A per-CPU counter summed over CPUs; 0 when it cannot be read.
pub fn sum(map: &aya::maps::PerCpuArray<MapData, u64>, index: u32) -> u64 {
    map.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

/// Every (key, value) of a hash map whose keys and values are plain `K`/`V` (not per-CPU).
pub fn dump<K: Pod + Eq + Hash, V: Pod>(map: &HashMap<MapData, K, V>) -> Vec<(K, V)> {
    match dump_batched::<K, V>(map.map()) {
        Ok(entries) => entries,
        Err(Unsupported) => dump_by_key(map),
    }
}

struct Unsupported;

fn dump_batched<K: Pod, V: Pod>(map: &MapData) -> Result<Vec<(K, V)>, Unsupported> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut out = Vec::new();
    // The hash map's batch token is a bucket index; a bucket larger than `chunk` entries
    // answers ENOSPC and is read again with room for it.
    let mut chunk = 4096usize;
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        // SAFETY: Pod types are plain bytes, for which all zeroes is a valid value.
        let (mut keys, mut values) =
            unsafe { (vec![std::mem::zeroed::<K>(); chunk], vec![std::mem::zeroed::<V>(); chunk]) };
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const token_in) as u64 },
            out_batch: (&raw mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: the attr points at buffers of `count` keys and values and at two u32
        // tokens, all alive for the call.
        let rc =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &raw mut attr, size_of::<BatchAttr>() as u32) };
        let errno = if rc < 0 { std::io::Error::last_os_error().raw_os_error() } else { None };
        let filled = attr.count as usize;
        match errno {
            None | Some(libc::ENOENT) => {
                out.extend(keys.into_iter().zip(values).take(filled));
                if errno == Some(libc::ENOENT) {
                    return Ok(out);
                }
                token_in = token_out;
                first = false;
            }
            Some(libc::ENOSPC) if chunk < 1 << 20 => chunk *= 4,
            // EINVAL/ENOTSUPP (524): the kernel or map type has no batch lookup.
            _ => return Err(Unsupported),
        }
    }
}

/// The fallback: walk key by key, keeping each key once. A restart caused by a concurrent
/// delete then repeats keys but never counts them twice.
fn dump_by_key<K: Pod + Eq + Hash, V: Pod>(map: &HashMap<MapData, K, V>) -> Vec<(K, V)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for key in map.keys().filter_map(Result::ok) {
        if seen.insert(key)
            && let Ok(value) = map.get(&key, 0)
        {
            out.push((key, value));
        }
    }
    out
}
