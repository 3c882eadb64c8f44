//! vCPUs: register/MSR/FPU/LAPIC set-up for the boot protocols, the per-vCPU `KVM_RUN` thread with
//! PIO/MMIO dispatch, and pause/resume from the control thread.
//!
//! Pausing uses the classic immediate-exit scheme: the control thread raises a flag and sends the
//! kick signal to every vCPU thread; the signal handler sets `kvm_run.immediate_exit`, so a thread
//! that is about to enter `KVM_RUN` returns at once and one that is inside returns with `EINTR`.
//! Each thread then parks on a condition variable; [`VcpuControl::pause`] returns only when every
//! thread has parked, so "all vCPUs are stopped" is a fact callers can rely on.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::{Bus, ExitReason, VmExitEvent};
use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_run, kvm_segment, CpuId, Msrs, KVM_EXIT_DIRTY_RING_FULL,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::{boot_gdt, BootProtocol, EntryPoint};
use crate::dirty_log::DirtyLog;
use crate::layout::*;
use crate::memory::GuestMemoryMmap;
use crate::timing;

/// Errors while setting up or running vCPUs.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        index: u32,
        /// The operation.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing the GDT/IDT into guest memory failed.
    #[error("vCPU {0}: cannot write descriptor tables into guest memory")]
    DescriptorTables(u32),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// A vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {0}: {1}")]
    Spawn(u32, std::io::Error),
    /// vCPUs did not park in time when asked to pause.
    #[error("{parked} of {total} vCPUs paused within the timeout")]
    PauseTimeout {
        /// vCPUs that parked.
        parked: usize,
        /// vCPUs in the VM.
        total: usize,
    },
}

type Result<T> = std::result::Result<T, VcpuError>;

fn kvm_err(index: u32, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm {
        index,
        what,
        source,
    }
}

// MSR indices used at boot.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 0x6;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

// LAPIC register offsets and delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Set CPUID, MSRs and LAPIC LINT pins; every vCPU gets this.
pub fn configure_common(fd: &VcpuFd, index: u32, cpuid: &CpuId) -> Result<()> {
    fd.set_cpuid2(cpuid)
        .map_err(kvm_err(index, "KVM_SET_CPUID2"))?;
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Kvm {
        index,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let set = fd.set_msrs(&msrs).map_err(kvm_err(index, "KVM_SET_MSRS"))?;
    if set != entries.len() {
        log::warn!(
            "vCPU {index}: KVM accepted {set} of {} boot MSRs",
            entries.len()
        );
    }
    let mut lapic = fd.get_lapic().map_err(kvm_err(index, "KVM_GET_LAPIC"))?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic)
        .map_err(kvm_err(index, "KVM_SET_LAPIC"))?;
    Ok(())
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, v) in b.iter_mut().enumerate() {
        *v = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

/// Set up the boot vCPU's FPU, registers and segments for `entry` (GDT/IDT are written to memory).
pub fn configure_boot_vcpu(
    fd: &VcpuFd,
    index: u32,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(kvm_err(index, "KVM_SET_FPU"))?;

    let gdt = boot_gdt(entry.protocol);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(|_| VcpuError::DescriptorTables(index))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|_| VcpuError::DescriptorTables(index))?;

    let mut sregs = fd.get_sregs().map_err(kvm_err(index, "KVM_GET_SREGS"))?;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.addr.0,
        ..Default::default()
    };
    match entry.protocol {
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = PVH_INFO_ADDR;
        }
        BootProtocol::Linux64 => {
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rsp = BOOT_STACK_TOP;
            regs.rbp = BOOT_STACK_TOP;
            regs.rsi = ZERO_PAGE_ADDR;
        }
    }
    fd.set_sregs(&sregs)
        .map_err(kvm_err(index, "KVM_SET_SREGS"))?;
    fd.set_regs(&regs).map_err(kvm_err(index, "KVM_SET_REGS"))?;
    Ok(())
}

/// Register state formatted for an error report.
pub fn describe_registers(fd: &VcpuFd) -> String {
    let mut s = String::new();
    match fd.get_regs() {
        Ok(r) => s.push_str(&format!(
            "rip={:#018x} rsp={:#018x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        )),
        Err(e) => s.push_str(&format!("registers unavailable: {e}")),
    }
    match fd.get_sregs() {
        Ok(sr) => s.push_str(&format!(
            " cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}(base {:#x}, l={}) idt={:#x}/{:#x} gdt={:#x}/{:#x}",
            sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer, sr.cs.selector, sr.cs.base, sr.cs.l,
            sr.idt.base, sr.idt.limit, sr.gdt.base, sr.gdt.limit
        )),
        Err(e) => s.push_str(&format!(" sregs unavailable: {e}")),
    }
    s
}

#[derive(Default)]
struct ControlState {
    pause: bool,
    stop: bool,
    parked: usize,
}

/// Shared pause/resume/stop state of all vCPU threads.
#[derive(Default)]
pub struct VcpuControl {
    state: Mutex<ControlState>,
    cv: Condvar,
    requested: std::sync::atomic::AtomicBool,
}

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kick(threads: &[libc::pthread_t]) {
        for &t in threads {
            // SAFETY: the vCPU threads are alive until the VM joins them, after stopping them
            // (no caller kicks after that), so each pthread_t is valid; the kick signal has a
            // handler installed by `install_kick_handler`.
            unsafe {
                libc::pthread_kill(t, kick_signal());
            }
        }
    }

    /// Stop every vCPU and wait until all `threads` have parked.
    pub fn pause(&self, threads: &[libc::pthread_t], timeout: Duration) -> Result<()> {
        let total = threads.len();
        {
            let mut st = self.lock();
            st.pause = true;
        }
        self.requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = std::time::Instant::now() + timeout;
        let pending = |st: &mut ControlState| st.parked < total && !st.stop;
        let mut st = self.lock();
        while pending(&mut st) {
            drop(st);
            Self::kick(threads);
            // `wait_timeout_while` looks before it waits: vCPUs that parked (and notified)
            // between the kick and this lock are not missed, which used to cost a whole re-kick
            // interval (20 ms of downtime in 1 of 5 migrations).
            let wait = deadline
                .saturating_duration_since(std::time::Instant::now())
                .min(Duration::from_millis(20));
            st = self
                .cv
                .wait_timeout_while(self.lock(), wait, pending)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if pending(&mut st) && std::time::Instant::now() >= deadline {
                return Err(VcpuError::PauseTimeout {
                    parked: st.parked,
                    total,
                });
            }
        }
        Ok(())
    }

    /// Ask every vCPU (threads `ids`) to park, without waiting for them (vCPU throttling: a
    /// vCPU inside a long guest run is kicked out of it).
    pub fn request_pause(&self, ids: &[libc::pthread_t]) {
        self.lock().pause = true;
        self.requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Self::kick(ids);
    }

    /// Make vCPU threads park before their first KVM_RUN (a restored VM starts paused).
    pub fn start_paused(&self) {
        self.lock().pause = true;
        self.requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Let paused vCPUs continue.
    pub fn resume(&self) {
        let mut st = self.lock();
        st.pause = false;
        self.requested
            .store(st.stop, std::sync::atomic::Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Ask every vCPU thread to exit and wake them.
    pub fn stop(&self, threads: &[libc::pthread_t]) {
        self.lock().stop = true;
        self.requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.cv.notify_all();
        Self::kick(threads);
    }

    /// Number of vCPU threads currently parked.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }

    /// Park (counted as paused) until the VM is stopped; used by a vCPU that hit a fatal exit.
    fn park_until_stop(&self) {
        let mut st = self.lock();
        st.parked += 1;
        self.cv.notify_all();
        while !st.stop {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Park while a pause is requested, calling `before_park` first (outside the lock). Returns
    /// false when the thread must exit.
    fn checkpoint(&self, before_park: impl FnOnce()) -> bool {
        if !self.requested.load(std::sync::atomic::Ordering::SeqCst) {
            return true;
        }
        if self.lock().pause {
            before_park();
        }
        let mut st = self.lock();
        if st.stop {
            return false;
        }
        if st.pause {
            st.parked += 1;
            self.cv.notify_all();
            while st.pause && !st.stop {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.parked -= 1;
            self.cv.notify_all();
        }
        !st.stop
    }
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: `p` points at this thread's vCPU `kvm_run` mapping, set by the vCPU thread
            // before it enters the run loop and valid until the thread ends (the VcpuFd lives on
            // that thread). A volatile byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*p).immediate_exit, 1) };
        }
    });
}

/// Install the kick signal handler (once per process).
pub fn install_kick_handler() -> Result<()> {
    static ONCE: std::sync::OnceLock<std::result::Result<(), i32>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| e.errno())
    })
    .map_err(|e| VcpuError::Signal(vmm_sys_util::errno::Error::new(e)))
}

/// What a vCPU thread needs to run.
pub struct Vcpu {
    /// vCPU index (also its APIC ID).
    pub index: u32,
    /// The KVM vCPU; the vCPU thread holds the lock only inside `KVM_RUN`, so the control thread
    /// can save or restore its state while it is paused.
    pub fd: Arc<Mutex<VcpuFd>>,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where fatal conditions and guest power requests are reported.
    pub exit: Arc<VmExitEvent>,
    /// Pause/stop control shared with the control thread.
    pub control: Arc<VcpuControl>,
    /// The VM's dirty tracking (a full dirty ring is harvested from the vCPU thread).
    pub dirty_log: Arc<DirtyLog>,
}

enum Outcome {
    Continue,
    Exit(ExitReason, Option<String>),
}

impl Vcpu {
    /// Start the vCPU on its own thread.
    pub fn spawn(self) -> Result<JoinHandle<()>> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                sandbox::apply_or_exit(sandbox::ThreadKind::Vcpu);
                self.run()
            })
            .map_err(|e| VcpuError::Spawn(index, e))
    }

    fn run(self) {
        let lock = || self.fd.lock().unwrap_or_else(|e| e.into_inner());
        let run_ptr: *mut kvm_run = lock().get_kvm_run();
        KVM_RUN.with(|p| p.set(run_ptr));
        let mut unhandled = UnhandledAccessLog::default();
        // Before parking, finish any port/MMIO access KVM is waiting to complete (an `in` whose
        // value we supplied is only written to the registers by the next KVM_RUN), so the saved
        // state is consistent: KVM_RUN with immediate_exit completes it and returns EINTR at once.
        let complete_pending_io = || {
            let mut fd = lock();
            fd.set_kvm_immediate_exit(1);
            match fd.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => log::warn!(
                    "vCPU {}: completing pending I/O before pausing: {e}",
                    self.index
                ),
                Ok(_) => log::warn!(
                    "vCPU {}: unexpected exit while completing pending I/O",
                    self.index
                ),
            }
            fd.set_kvm_immediate_exit(0);
        };
        loop {
            if !self.control.checkpoint(complete_pending_io) {
                break;
            }
            if self.index == 0 {
                timing::mark_first_kvm_run();
            }
            let outcome = {
                let mut fd = lock();
                match fd.run() {
                    Ok(exit) => {
                        let buses = (&*self.pio, &*self.mmio, &*self.dirty_log);
                        handle_exit(self.index, exit, buses, &mut unhandled)
                    }
                    Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                        fd.set_kvm_immediate_exit(0);
                        Outcome::Continue
                    }
                    Err(e) => {
                        Outcome::Exit(ExitReason::VcpuError, Some(format!("KVM_RUN failed: {e}")))
                    }
                }
            };
            if let Outcome::Exit(reason, what) = outcome {
                if let Some(what) = what {
                    log::error!(
                        "vCPU {}: {what}; {}",
                        self.index,
                        describe_registers(&lock())
                    );
                }
                self.exit.request(reason);
                self.control.park_until_stop();
                break;
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }
}

/// Rate-limits the log lines about guest accesses nobody claims (Linux probes many legacy ports).
#[derive(Default)]
struct UnhandledAccessLog {
    count: u64,
}

impl UnhandledAccessLog {
    fn note(&mut self, index: u32, kind: &str, addr: u64, len: usize) {
        self.count += 1;
        if self.count <= 16 || self.count.is_power_of_two() {
            log::debug!(
                "vCPU {index}: unhandled {kind} access at {addr:#x} ({len} bytes; {} so far)",
                self.count
            );
        }
    }
}

fn handle_exit(
    index: u32,
    exit: VcpuExit,
    (pio, mmio, dirty_log): (&Bus, &Bus, &DirtyLog),
    log: &mut UnhandledAccessLog,
) -> Outcome {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if pio.read(u64::from(port), data).is_err() {
                data.fill(0xff);
                log.note(index, "port read", u64::from(port), data.len());
            }
        }
        VcpuExit::IoOut(port, data) => {
            if pio.write(u64::from(port), data).is_err() && port != 0x80 {
                log.note(index, "port write", u64::from(port), data.len());
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if mmio.read(addr, data).is_err() {
                data.fill(0xff);
                log.note(index, "MMIO read", addr, data.len());
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if mmio.write(addr, data).is_err() {
                log.note(index, "MMIO write", addr, data.len());
            }
        }
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        VcpuExit::Shutdown => {
            return Outcome::Exit(
                ExitReason::VcpuError,
                Some("triple fault (KVM_EXIT_SHUTDOWN)".into()),
            )
        }
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => return Outcome::Exit(ExitReason::PowerOff, None),
            KVM_SYSTEM_EVENT_RESET => return Outcome::Exit(ExitReason::Reset, None),
            KVM_SYSTEM_EVENT_CRASH => {
                return Outcome::Exit(ExitReason::VcpuError, Some("guest crash event".into()))
            }
            other => log::warn!("vCPU {index}: ignoring system event {other}"),
        },
        VcpuExit::FailEntry(reason, cpu) => {
            return Outcome::Exit(
                ExitReason::VcpuError,
                Some(format!(
                    "VM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                )),
            )
        }
        // The vCPU's dirty ring is full: harvest the rings here (the pages wait for the next
        // sync) so the vCPU can run on; KVM_RUN would refuse to enter with the ring full.
        VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
            if let Err(e) = dirty_log.ring_full() {
                return Outcome::Exit(
                    ExitReason::VcpuError,
                    Some(format!("dirty ring full and cannot be harvested: {e}")),
                );
            }
        }
        VcpuExit::InternalError => {
            return Outcome::Exit(
                ExitReason::VcpuError,
                Some("KVM internal error (emulation failure?)".into()),
            )
        }
        other => {
            return Outcome::Exit(
                ExitReason::VcpuError,
                Some(format!("unexpected exit {other:?}")),
            )
        }
    }
    Outcome::Continue
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::gdt_entry;

    #[test]
    fn segments_from_gdt() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.selector, code.l, code.db, code.present, code.type_),
            (8, 1, 0, 1, 0xb)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(
            (data.selector, data.db, data.s, data.type_),
            (0x10, 1, 1, 3)
        );
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn lvt_mode_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x10;
        regs[APIC_LVT0 + 1] = 0x07; // old mode bits set
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT0] as u8, 0x10);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x04);
    }
}
