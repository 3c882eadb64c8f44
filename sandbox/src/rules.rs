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
/// memfds, snapshot directories, vfio-user and migration sockets; ioctls of any kind (KVM,
/// VFIO, iommufd, TUN, terminals for ptys, block-device sizes: these threads build VMs from
/// whatever the configuration names, and every thread inherits their filter); signals to vCPU
/// threads.
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

/// The vCPU thread: kicks. Its ioctls are in [`VCPU_IOCTLS`]. Kernel VFIO BAR access
/// (pread/pwrite on the device fd) and vfio-user BAR access (messages on the client socket)
/// come from [`FILE_IO`] and [`SOCKET_IO`]; a virtio device's worker is started by the guest's
/// DRIVER_OK write, so from a vCPU thread: [`SPAWN`] and [`EVENT_LOOP`] too.
const VCPU: &[c_long] = &[SYS_tgkill];

/// The API thread: accepting connections. Its ioctls are in [`API_IOCTLS`].
const API: &[c_long] = &[SYS_accept4];

/// An ioctl request the filter allows: a whole ioctl type (the `_IOC` type byte, bits 8-15, of
/// every request of a subsystem), or one request exactly.
#[derive(Clone, Copy)]
enum Ioctl {
    /// Every request of this type byte.
    Type(u8),
    /// This request only.
    Exact(u64),
}

/// KVM's ioctl type (`KVMIO`, linux/kvm.h).
const KVM_TYPE: u8 = 0xAE;
/// VFIO's ioctl type (`VFIO_TYPE`, linux/vfio.h), which iommufd shares (`IOMMUFD_TYPE`).
const VFIO_TYPE: u8 = b';';

/// Descriptor flags std and tokio set with ioctls: non-blocking mode and close-on-exec.
const FD_FLAGS_IOCTLS: &[Ioctl] = &[Ioctl::Exact(FIONBIO), Ioctl::Exact(FIOCLEX)];

/// The vCPU thread's ioctls. KVM: KVM_RUN and register access, and what an MMIO/PIO access can
/// trigger on the VM (BAR moves remap memory slots, MSI-X writes change GSI routes, DRIVER_OK
/// registers irqfds and ioeventfds). VFIO (and iommufd): a guest's MSI-X or INTx set-up on a
/// kernel passthrough device (VFIO_DEVICE_SET_IRQS), its config space and resets. TUN: the
/// offloads a virtio-net driver acked, set when DRIVER_OK activates the device. Terminal
/// ioctls (TIOCSTI and the like), block-device, socket and any other ioctl are refused.
const VCPU_IOCTLS: &[&[Ioctl]] = &[
    &[
        Ioctl::Type(KVM_TYPE),
        Ioctl::Type(VFIO_TYPE),
        Ioctl::Exact(TUNSETOFFLOAD),
    ],
    FD_FLAGS_IOCTLS,
];

/// Device workers' ioctls: virtio-iommu's worker maps and unmaps guest DMA for kernel
/// passthrough devices (VFIO_IOMMU_MAP_DMA on the container, or iommufd's IOAS_MAP).
const DEVICE_WORKER_IOCTLS: &[&[Ioctl]] = &[&[Ioctl::Type(VFIO_TYPE)], FD_FLAGS_IOCTLS];

/// The API thread's ioctls: its sockets' flags.
const API_IOCTLS: &[&[Ioctl]] = &[FD_FLAGS_IOCTLS];

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
    let ioctls = match kind {
        ThreadKind::Vcpu => Some(VCPU_IOCTLS),
        ThreadKind::DeviceWorker => Some(DEVICE_WORKER_IOCTLS),
        ThreadKind::Api => Some(API_IOCTLS),
        // Control and migration allow every ioctl (VM_LIFECYCLE); passthrough threads none.
        ThreadKind::Control | ThreadKind::Migration | ThreadKind::Passthrough => None,
    };
    if let Some(groups) = ioctls {
        map.insert(SYS_ioctl, ioctl_rules(groups)?);
    }
    Ok(map)
}

/// One rule per allowed request or type, on the request argument's low 32 bits (the kernel
/// takes `cmd` as an unsigned int).
fn ioctl_rules(groups: &[&[Ioctl]]) -> Result<Vec<SeccompRule>, BackendError> {
    groups
        .iter()
        .flat_map(|g| g.iter())
        .map(|&i| {
            let condition = match i {
                Ioctl::Type(t) => SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(0xff00),
                    u64::from(t) << 8,
                ),
                Ioctl::Exact(request) => {
                    SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                }
            }?;
            SeccompRule::new(vec![condition])
        })
        .collect()
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
