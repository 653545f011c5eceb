//! The kernel check: fails at start, with a message saying what is missing, on a kernel too
//! old for the reactor or without io_uring, rather than failing later on the first operation
//! the kernel lacks.

use io_uring::{IoUring, opcode};

/// The oldest kernel with everything the reactor uses (multishot receive).
pub const KERNEL_MINIMUM: (u32, u32) = (6, 0);

/// Fails with a clear message on a kernel older than [`KERNEL_MINIMUM`] or without io_uring.
pub fn check_kernel() -> Result<(), String> {
    // SAFETY: uname writes into the zeroed struct we pass.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid, writable utsname.
    if unsafe { libc::uname(&mut name) } != 0 {
        return Err("uname failed: cannot tell the kernel version".into());
    }
    // SAFETY: uname NUL-terminates `release`.
    let release = unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version < KERNEL_MINIMUM {
        return Err(format!(
            "Linux {release} is too old: shardmq needs Linux {}.{} or later (io_uring multishot receive and provided buffer rings)",
            KERNEL_MINIMUM.0, KERNEL_MINIMUM.1
        ));
    }
    let ring = IoUring::new(8).map_err(|error| format!("io_uring is not available ({error}); is it disabled by sysctl kernel.io_uring_disabled?"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|error| format!("probing io_uring failed: {error}"))?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::Read::CODE, "read"),
        (opcode::AsyncCancel::CODE, "cancel"),
        (opcode::OpenAt::CODE, "openat"),
        (opcode::Write::CODE, "write"),
        (opcode::Fsync::CODE, "fsync"),
        (opcode::Close::CODE, "close"),
        (opcode::UnlinkAt::CODE, "unlinkat"),
        (opcode::Connect::CODE, "connect"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!(
                "the kernel's io_uring lacks the {name} operation: shardmq needs Linux {}.{} or later",
                KERNEL_MINIMUM.0, KERNEL_MINIMUM.1
            ));
        }
    }
    Ok(())
}
