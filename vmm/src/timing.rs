//! Start-up timing and memory-overhead figures that `skiff` logs (and `benches/boot.rs` collects).

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();
static FIRST_KVM_RUN: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds of `CLOCK_MONOTONIC` (the clock `std::time::Instant` uses), comparable across processes.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Record the start of `main` (call first thing).
pub fn mark_start() {
    let _ = START.set(Instant::now());
}

/// Record the boot vCPU's first `KVM_RUN`; logs the figure the first time.
pub fn mark_first_kvm_run() {
    if FIRST_KVM_RUN.get().is_some() {
        return;
    }
    let now = Instant::now();
    let mono = monotonic_ns();
    if FIRST_KVM_RUN.set(now).is_ok() {
        let since = START.get().map(|s| now.duration_since(*s));
        log::info!(
            "timing: first KVM_RUN {:.3} ms after main() (monotonic {} ns)",
            since.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
            mono
        );
    }
}

/// Resident memory of this process, split by kind, from `/proc/self/status` (KiB).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResidentMemory {
    /// Private anonymous memory (heap, stacks).
    pub anon_kib: u64,
    /// File-backed mappings (the binary, libraries).
    pub file_kib: u64,
    /// Shared memory: guest RAM (memfd) pages the guest or VMM touched.
    pub shmem_kib: u64,
}

impl ResidentMemory {
    /// Read the current figures.
    pub fn current() -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string("/proc/self/status")?))
    }

    /// Parse the text of a `/proc/PID/status` file.
    pub fn parse(status: &str) -> Self {
        let mut r = Self::default();
        for line in status.lines() {
            let mut it = line.split_whitespace();
            let (Some(key), Some(val)) = (it.next(), it.next()) else {
                continue;
            };
            let Ok(v) = val.parse() else { continue };
            match key {
                "RssAnon:" => r.anon_kib = v,
                "RssFile:" => r.file_kib = v,
                "RssShmem:" => r.shmem_kib = v,
                _ => {}
            }
        }
        r
    }

    /// Memory the VMM itself uses beyond guest RAM (anonymous + file-backed).
    pub fn overhead_kib(&self) -> u64 {
        self.anon_kib + self.file_kib
    }
}

/// Log the VMM's resident memory beyond guest RAM (guest RAM is the memfd, counted as shmem).
pub fn log_memory_overhead(when: &str) {
    match ResidentMemory::current() {
        Ok(m) => log::info!(
            "memory: VMM overhead {} KiB beyond guest RAM {when} (anon {} KiB, file {} KiB; guest RAM resident {} KiB)",
            m.overhead_kib(),
            m.anon_kib,
            m.file_kib,
            m.shmem_kib
        ),
        Err(e) => log::warn!("memory: cannot read /proc/self/status: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let s = "Name:\tskiff\nVmRSS:\t  9000 kB\nRssAnon:\t 1200 kB\nRssFile:\t 2300 kB\nRssShmem:\t 5500 kB\n";
        let m = ResidentMemory::parse(s);
        assert_eq!(
            m,
            ResidentMemory {
                anon_kib: 1200,
                file_kib: 2300,
                shmem_kib: 5500
            }
        );
        assert_eq!(m.overhead_kib(), 3500);
        assert!(ResidentMemory::current().unwrap().anon_kib > 0);
    }
}
