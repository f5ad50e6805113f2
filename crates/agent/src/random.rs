//! Reseeding the guest's random generator with bytes from the host (`ReseedRandomDev`). A VM
//! cloned from a template starts with its template's random state; without a reseed every clone
//! would draw the same "random" numbers until the kernel reseeds on its own.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use crate::container::AgentError;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// The most the host may send (the kernel's pool is 256 bits; more is not useful).
const MAX_SEED: usize = 4096;

/// Credits `data` to the input pool and reseeds the kernel's generator from it.
pub fn reseed_random(data: &[u8]) -> Result<(), AgentError> {
    if data.is_empty() || data.len() > MAX_SEED {
        return Err(AgentError::Invalid(format!(
            "ReseedRandomDev: {} bytes of seed; send 1 to {MAX_SEED}",
            data.len()
        )));
    }
    let dev = OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .map_err(|e| AgentError::Failed(format!("open /dev/random: {e}")))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + data.len());
    let bits = i32::try_from(data.len() * 8).unwrap_or(i32::MAX);
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&(data.len() as i32).to_ne_bytes());
    info.extend_from_slice(data);
    info.resize(8 + data.len().div_ceil(4) * 4, 0);
    // SAFETY: the buffer is a complete rand_pool_info of buf_size bytes, alive for the call.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(AgentError::Failed(format!(
            "RNDADDENTROPY: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: an ioctl without argument.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(AgentError::Failed(format!(
            "RNDRESEEDCRNG: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
