//! Batched reads and deletes of hash maps (BPF_MAP_LOOKUP_BATCH and
//! BPF_MAP_DELETE_BATCH), which aya 0.14 does not wrap.
//!
//! Walking a map key by key costs two syscalls per entry: 2.5 s for a full
//! conntrack of 262,144 flows, held under the lock that programs services.
//! A batch moves thousands of entries per syscall.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries asked for per syscall.
const CHUNK: usize = 8192;

/// The `batch` member of `union bpf_attr`.
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

/// bpf(2) with a batch attribute; on failure, the errno and the count the
/// kernel left (entries it did process).
fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> Result<(), (io::Error, u32)> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix for the batch
    // commands; the kernel reads and writes only within its size and the
    // buffers it points to, which the callers size for `count` entries.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if ret < 0 {
        Err((io::Error::last_os_error(), attr.count))
    } else {
        Ok(())
    }
}

/// Every (key, value) of a hash map. Entries added or removed meanwhile may
/// be seen or missed; each bucket is read consistently.
pub(crate) fn lookup_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    // For hash maps the batch token is a bucket index (u32).
    let mut token: u32 = 0;
    let mut first = true;
    loop {
        let mut keys: Vec<K> = Vec::with_capacity(chunk);
        let mut values: Vec<V> = Vec::with_capacity(chunk);
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let (done, filled) = match result {
            Ok(()) => (false, attr.count),
            Err((e, filled)) if e.raw_os_error() == Some(libc::ENOENT) => (true, filled),
            // A bucket holds more entries than fit: ask for more at once.
            Err((e, _)) if e.raw_os_error() == Some(libc::ENOSPC) && chunk < 1 << 20 => {
                chunk *= 2;
                continue;
            }
            Err((e, _)) => return Err(e),
        };
        let filled = (filled as usize).min(chunk);
        // SAFETY: the kernel wrote `filled` keys and values; Pod types are
        // valid for any bit pattern.
        unsafe {
            keys.set_len(filled);
            values.set_len(filled);
        }
        out.extend(keys.into_iter().zip(values));
        if done {
            return Ok(out);
        }
        token = next;
        first = false;
    }
}

/// Deletes `keys` from a hash map; keys already gone are skipped. Returns
/// how many were deleted.
pub(crate) fn delete<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let len = rest.len().min(CHUNK);
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: len as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match bpf_batch(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => {
                deleted += attr.count as usize;
                rest = &rest[len..];
            }
            // The batch stops at a key that is gone (a flow that closed
            // meanwhile): count what went, skip that key, go on.
            Err((e, done)) if e.raw_os_error() == Some(libc::ENOENT) => {
                let done = (done as usize).min(len);
                deleted += done;
                rest = &rest[(done + 1).min(rest.len())..];
            }
            Err((e, _)) => return Err(e),
        }
    }
    Ok(deleted)
}
