//! The seccomp rules: one function per thread kind, built from named syscall groups, each with
//! why its thread needs it. The lists were derived from what the threads do, then checked by
//! running the whole test suite with `--seccomp log` and reading the kernel's audit records.
//!
//! A thread inherits its parent's filter and the kernel applies both, so a kind that spawns
//! threads (control, migration) must allow everything its children need, and every parent must
//! allow what a child does before it installs its own filter ([`SPAWN`]).

use std::collections::BTreeMap;

use libc::*;
use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::ThreadKind;

/// Every thread: the allocator and thread stacks.
const MEMORY: &[c_long] = &[
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_madvise,
    SYS_mprotect,
    SYS_brk,
];

/// Every thread: mutexes, condvars, channels and thread parking.
const SYNC: &[c_long] = &[SYS_futex, SYS_sched_yield];

/// Every thread: clocks and sleeps (normally the vDSO; these are its fallbacks).
const TIME: &[c_long] = &[
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_gettimeofday,
];

/// Every thread: logging to stderr, eventfd signalling, reading and writing the descriptors it
/// was handed, and closing them.
const IO: &[c_long] = &[SYS_read, SYS_write, SYS_readv, SYS_writev, SYS_close];

/// Every thread: signal returns and masks (vCPU kicks, termination), hash-map seeds, its own
/// identity for logs and the SIGSYS report, and ending.
const LIFECYCLE: &[c_long] = &[
    SYS_rt_sigreturn,
    SYS_rt_sigprocmask,
    SYS_sigaltstack,
    SYS_getrandom,
    SYS_gettid,
    SYS_getpid,
    SYS_sched_getaffinity,
    SYS_exit,
    SYS_exit_group,
];

/// Threads that spawn threads: a new thread starts under its parent's filter, sets up its
/// stack, robust futex list and rseq area, names itself, then installs its own filter
/// (no_new_privs + seccomp).
const SPAWN: &[c_long] = &[
    SYS_clone,
    SYS_clone3,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_seccomp,
];

/// Event loops (event-manager, tokio): epoll and eventfds.
const EVENT_LOOP: &[c_long] = &[
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_eventfd2,
    SYS_poll,
    SYS_ppoll,
];

/// Disk images and state files already open: positioned I/O, flushes, discards, sizes.
const FILE_IO: &[c_long] = &[
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_lseek,
    SYS_fsync,
    SYS_fdatasync,
    SYS_fallocate,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
];

/// Connected sockets (vfio-user, migration, API): messages with fds, options, shutdown.
const SOCKET_IO: &[c_long] = &[
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendto,
    SYS_recvfrom,
    SYS_shutdown,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_fcntl,
];

/// Building and tearing down a VM: opening kernels, disks, TAPs, /dev/kvm and VFIO, guest RAM
/// memfds, snapshot directories, vfio-user and migration sockets; KVM and VFIO ioctls; signals
/// to vCPU threads.
const VM_LIFECYCLE: &[c_long] = &[
    SYS_openat,
    SYS_open,
    SYS_ioctl,
    SYS_memfd_create,
    SYS_ftruncate,
    SYS_dup,
    SYS_dup3,
    SYS_pipe2,
    SYS_mkdirat,
    SYS_mkdir,
    SYS_unlinkat,
    SYS_unlink,
    SYS_renameat,
    SYS_rename,
    SYS_getdents64,
    SYS_chmod,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_readlink,
    SYS_readlinkat,
    SYS_access,
    SYS_faccessat2,
    SYS_getcwd,
    SYS_socket,
    SYS_socketpair,
    SYS_connect,
    SYS_bind,
    SYS_listen,
    SYS_accept4,
    SYS_tgkill,
    SYS_rt_sigaction,
    SYS_signalfd4,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_sched_setaffinity,
    SYS_getuid,
    SYS_geteuid,
    SYS_uname,
    SYS_sysinfo,
];

/// The vCPU thread: KVM_RUN and the device ioctls an MMIO/PIO access can trigger (BAR moves,
/// MSI-X routes, irqfds, ioeventfds, VFIO IRQ set-up), and kicks. Kernel VFIO BAR access
/// (pread/pwrite on the device fd) and vfio-user BAR access (messages on the client socket)
/// come from [`FILE_IO`] and [`SOCKET_IO`]; a virtio device's worker is started by the guest's
/// DRIVER_OK write, so from a vCPU thread: [`SPAWN`] and [`EVENT_LOOP`] too.
const VCPU: &[c_long] = &[SYS_ioctl, SYS_tgkill];

/// The API thread: accepting connections (tokio sets them non-blocking).
const API: &[c_long] = &[SYS_accept4, SYS_ioctl];

/// The `prctl` options threads use: naming a new thread, and setting no_new_privs before a
/// filter is installed.
const PRCTL_OPTIONS: &[c_int] = &[PR_SET_NAME, PR_GET_NAME, PR_SET_NO_NEW_PRIVS];

/// The rules of `kind`: syscall number → conditions (an empty list allows it outright).
pub(crate) fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let common: &[&[c_long]] = &[MEMORY, SYNC, TIME, IO, LIFECYCLE];
    let own: &[&[c_long]] = match kind {
        ThreadKind::Control | ThreadKind::Migration => {
            &[SPAWN, EVENT_LOOP, FILE_IO, SOCKET_IO, VM_LIFECYCLE]
        }
        ThreadKind::Vcpu => &[FILE_IO, SOCKET_IO, VCPU, SPAWN, EVENT_LOOP],
        ThreadKind::Api => &[EVENT_LOOP, SOCKET_IO, API],
        // SOCKET_IO: virtio-iommu's worker sends map/unmap requests to vfio-user servers.
        ThreadKind::DeviceWorker => &[EVENT_LOOP, FILE_IO, SOCKET_IO],
        ThreadKind::Passthrough => &[SOCKET_IO, FILE_IO],
    };
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = common
        .iter()
        .chain(own)
        .flat_map(|g| g.iter())
        .map(|&nr| (nr, Vec::new()))
        .collect();
    map.insert(SYS_prctl, prctl_rules()?);
    Ok(map)
}

fn prctl_rules() -> Result<Vec<SeccompRule>, BackendError> {
    PRCTL_OPTIONS
        .iter()
        .map(|&option| {
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                option as u64,
            )?])
        })
        .collect()
}
