//! Tests of the virtio-pci transport against a fake virtio device.

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::virtio::{
    device_type, features, status, AccessPlatform, ActivatedQueue, DmaAccess, DmaFault, ErrorHook,
    VirtioDevice, VirtioError, VirtioInterrupt, VirtioInterruptType,
};
use devices::GuestMemoryMmap;
use migration::Snapshottable;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::*;
use crate::configuration::{BarKind, BAR0_REG, CAPABILITY_POINTER_REG, COMMAND_STATUS_REG};
use crate::device::PciDevice;
use crate::function::PciFunction;
use crate::interrupt::fake::FakeInterruptManager;
use crate::msix::{MSIX_ENABLE, MSIX_TABLE_ENTRY_SIZE};

const FEATURE_X: u64 = 1 << 5;
const OFFERED: u64 = features::VIRTIO_F_VERSION_1
    | features::VIRTIO_F_EVENT_IDX
    | features::VIRTIO_F_ACCESS_PLATFORM
    | FEATURE_X;

/// What the device saw of one queue at activation: (index, size, event_idx, desc, next_avail).
type SeenQueue = (u16, u16, bool, u64, u16);

#[derive(Default)]
struct FakeState {
    acked: u64,
    /// Queues of each activation.
    activations: Vec<Vec<SeenQueue>>,
    kicks: Vec<vmm_sys_util::eventfd::EventFd>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    resets: usize,
    config: [u8; 8],
    fail_activate: bool,
    /// Whether each activation was given an access platform.
    access: Vec<bool>,
    /// The device broke on its own and needs a reset.
    broken: bool,
    /// Whether the transport handed the device an error hook.
    has_error_hook: bool,
}

struct FakeDevice(Arc<Mutex<FakeState>>);

impl migration::Pausable for FakeDevice {}

/// A device without state of its own: an empty section.
impl Snapshottable for FakeDevice {
    fn id(&self) -> String {
        "fake0".into()
    }
    fn snapshot(&mut self) -> Result<migration::StateSection, migration::StateError> {
        Ok(migration::StateSection {
            id: self.id(),
            version: 1,
            data: Vec::new(),
        })
    }
    fn restore(&mut self, _section: &migration::StateSection) -> Result<(), migration::StateError> {
        Ok(())
    }
}

impl migration::Migratable for FakeDevice {}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 64]
    }
    fn avail_features(&self) -> u64 {
        OFFERED
    }
    fn set_acked_features(&mut self, features: u64) {
        self.0.lock().unwrap().acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let s = self.0.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            *b = s.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut s = self.0.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = s.config.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
        access: Option<Arc<dyn AccessPlatform>>,
    ) -> Result<(), VirtioError> {
        let mut s = self.0.lock().unwrap();
        s.access.push(access.is_some());
        if s.fail_activate {
            return Err(VirtioError::Activate {
                id: "fake0".into(),
                reason: "told to fail".into(),
            });
        }
        let list = queues
            .iter()
            .map(|q| {
                (
                    q.index,
                    q.queue.size(),
                    q.queue.event_idx_enabled(),
                    q.queue.desc_table(),
                    q.queue.next_avail(),
                )
            })
            .collect();
        s.activations.push(list);
        s.kicks = queues.into_iter().map(|q| q.kick).collect();
        s.interrupt = Some(interrupt);
        Ok(())
    }
    fn needs_reset(&self) -> bool {
        self.0.lock().unwrap().broken
    }
    fn set_error_hook(&mut self, _hook: ErrorHook) {
        self.0.lock().unwrap().has_error_hook = true;
    }
    fn reset(&mut self) {
        let mut s = self.0.lock().unwrap();
        s.resets += 1;
        s.broken = false;
        s.interrupt = None;
        s.kicks.clear();
    }
}

struct Setup {
    im: Arc<FakeInterruptManager>,
    state: Arc<Mutex<FakeState>>,
    dev: VirtioPciDevice,
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn setup() -> Setup {
    let im = Arc::new(FakeInterruptManager::default());
    let state = Arc::new(Mutex::new(FakeState::default()));
    let dev = VirtioPciDevice::new(
        Box::new(FakeDevice(state.clone())),
        memory(),
        im.clone(),
        Some((1, 17)),
    )
    .unwrap();
    Setup { im, state, dev }
}

// Common configuration offsets.
const DFSELECT: u64 = 0x00;
const DF: u64 = 0x04;
const GFSELECT: u64 = 0x08;
const GF: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const STATUS: u64 = 0x14;
const QSELECT: u64 = 0x16;
const QSIZE: u64 = 0x18;
const QVECTOR: u64 = 0x1a;
const QENABLE: u64 = 0x1c;
const QNOTIFYOFF: u64 = 0x1e;
const QDESC: u64 = 0x20;
const QDRIVER: u64 = 0x28;
const QDEVICE: u64 = 0x30;

fn wr(d: &mut VirtioPciDevice, off: u64, v: u64, len: usize) {
    d.write(0, off, &v.to_le_bytes()[..len]);
}

fn rd(d: &mut VirtioPciDevice, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.read(0, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn status(d: &mut VirtioPciDevice) -> u8 {
    rd(d, STATUS, 1) as u8
}

fn negotiate(d: &mut VirtioPciDevice, features: u64) {
    wr(d, STATUS, u64::from(status::ACKNOWLEDGE), 1);
    wr(
        d,
        STATUS,
        u64::from(status::ACKNOWLEDGE | status::DRIVER),
        1,
    );
    wr(d, GFSELECT, 0, 4);
    wr(d, GF, features & 0xffff_ffff, 4);
    wr(d, GFSELECT, 1, 4);
    wr(d, GF, features >> 32, 4);
    wr(
        d,
        STATUS,
        u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        1,
    );
}

fn setup_queue(d: &mut VirtioPciDevice, q: u16, size: u16, base: u64) {
    wr(d, QSELECT, u64::from(q), 2);
    wr(d, QSIZE, u64::from(size), 2);
    wr(d, QDESC, base, 8);
    // The driver ring through two dword writes.
    wr(d, QDRIVER, (base + 0x1000) & 0xffff_ffff, 4);
    wr(d, QDRIVER + 4, (base + 0x1000) >> 32, 4);
    wr(d, QDEVICE, base + 0x2000, 8);
    wr(d, QENABLE, 1, 2);
}

fn driver_ok(d: &mut VirtioPciDevice) {
    wr(
        d,
        STATUS,
        u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK),
        1,
    );
}

/// Walk the capability list: (offset, id, cfg_type for vendor caps).
fn capabilities(d: &mut VirtioPciDevice) -> Vec<(usize, u8, u8)> {
    let mut caps = Vec::new();
    let mut ptr = (d.config_read(CAPABILITY_POINTER_REG) & 0xfc) as usize;
    while ptr != 0 {
        let r = d.config_read(ptr / 4);
        caps.push((ptr, r as u8, (r >> 24) as u8));
        ptr = ((r >> 8) & 0xfc) as usize;
    }
    caps
}

fn enable_msix(d: &mut VirtioPciDevice) {
    let (off, _, _) = capabilities(d)
        .into_iter()
        .find(|c| c.1 == crate::configuration::CAP_ID_MSIX)
        .unwrap();
    d.config_write(off / 4, 2, &MSIX_ENABLE.to_le_bytes());
}

fn program_vector(d: &mut VirtioPciDevice, v: u64, addr: u64, data: u32) {
    let base = MSIX_TABLE_OFFSET + v * MSIX_TABLE_ENTRY_SIZE;
    wr(d, base, addr, 8);
    wr(d, base + 8, u64::from(data), 4);
    wr(d, base + 12, 0, 4);
}

#[test]
fn identity_bars_and_capabilities() {
    let Setup { mut dev, .. } = setup();
    assert_eq!(dev.config_read(0), 0x1042_1af4);
    assert_eq!(dev.config_read(2), 0x0180_0001);
    assert_eq!(dev.config_read(11), 0x1100_1af4);
    assert_eq!((dev.config_read(15) >> 8) & 0xff, 1, "INTA#");
    let bars: Vec<_> = dev
        .bar_requests()
        .into_iter()
        .map(|b| (b.index, b.size, b.kind, b.mapped.len()))
        .collect();
    assert_eq!(
        bars,
        [(
            0,
            VIRTIO_BAR_SIZE,
            BarKind::Mem64 {
                prefetchable: false
            },
            0
        )]
    );
    assert_eq!(dev.kind(), "virtio-blk");
    dev.set_bar(0, 0x10_0000_0000).unwrap();
    assert_eq!(dev.bar_address(0), Some(0x10_0000_0000));
    assert!(dev.set_bar(0, 0x10_0000_0100).is_err());
    let ids: Vec<_> = capabilities(&mut dev)
        .iter()
        .map(|c| (c.1, if c.1 == 9 { c.2 } else { 0 }))
        .collect();
    assert_eq!(
        ids,
        [
            (9, VIRTIO_PCI_CAP_COMMON_CFG),
            (9, VIRTIO_PCI_CAP_ISR_CFG),
            (9, VIRTIO_PCI_CAP_DEVICE_CFG),
            (9, VIRTIO_PCI_CAP_NOTIFY_CFG),
            (0x11, 0)
        ]
    );
    let caps = capabilities(&mut dev);
    // Notify capability: bar 0, offset, length 2 queues * 4, multiplier 4.
    let n = caps[3].0 / 4;
    assert_eq!(dev.config_read(n) >> 8 & 0xff, caps[4].0 as u32);
    assert_eq!(dev.config_read(n) >> 16 & 0xff, 20);
    assert_eq!(dev.config_read(n + 1) & 0xff, 0);
    assert_eq!(dev.config_read(n + 2), NOTIFY_OFFSET as u32);
    assert_eq!(dev.config_read(n + 3), 8);
    assert_eq!(dev.config_read(n + 4), NOTIFY_OFF_MULTIPLIER);
    // MSI-X: 3 vectors, table and PBA in BAR 0.
    let m = caps[4].0 / 4;
    assert_eq!(dev.config_read(m) >> 16, 2);
    assert_eq!(dev.config_read(m + 1), MSIX_TABLE_OFFSET as u32);
    assert_eq!(dev.config_read(m + 2), MSIX_PBA_OFFSET as u32);
    assert_eq!(dev.msix_gsis(), [24, 25, 26]);
    assert_eq!(dev.intx_gsi(), Some(17));
    let fds: Vec<u64> = dev
        .ioeventfds(0, 0x10_0000_0000)
        .iter()
        .map(|e| e.addr)
        .collect();
    assert_eq!(fds, [0x10_0000_3000, 0x10_0000_3004]);
    assert!(dev.ioeventfds(2, 0x10_0000_0000).is_empty());
}

#[test]
fn class_codes() {
    assert_eq!(class_code(device_type::NET), (2, 0, 0));
    assert_eq!(class_code(device_type::BLOCK), (1, 0x80, 0));
    assert_eq!(class_code(device_type::CONSOLE), (7, 0x80, 0));
    assert_eq!(class_code(device_type::RNG), (0xff, 0, 0));
}

#[test]
fn feature_negotiation() {
    let Setup { mut dev, state, .. } = setup();
    assert_eq!(rd(&mut dev, DF, 4), OFFERED & 0xffff_ffff);
    wr(&mut dev, DFSELECT, 1, 4);
    assert_eq!(rd(&mut dev, DF, 4), OFFERED >> 32);
    wr(&mut dev, DFSELECT, 7, 4);
    assert_eq!(rd(&mut dev, DF, 4), 0);
    assert_eq!(rd(&mut dev, NUM_QUEUES, 2), 2);

    // An unoffered feature: FEATURES_OK does not stick.
    negotiate(&mut dev, OFFERED | 1 << 7);
    assert_eq!(status(&mut dev) & status::FEATURES_OK, 0);
    // Without VERSION_1 neither.
    wr(&mut dev, STATUS, 0, 1);
    negotiate(&mut dev, FEATURE_X);
    assert_eq!(status(&mut dev) & status::FEATURES_OK, 0);
    // A subset with VERSION_1 is accepted and reaches the device.
    wr(&mut dev, STATUS, 0, 1);
    let want = features::VIRTIO_F_VERSION_1 | FEATURE_X;
    negotiate(&mut dev, want);
    assert_ne!(status(&mut dev) & status::FEATURES_OK, 0);
    assert_eq!(state.lock().unwrap().acked, want);
    // Read back; later writes are ignored.
    wr(&mut dev, GFSELECT, 0, 4);
    assert_eq!(rd(&mut dev, GF, 4), FEATURE_X);
    wr(&mut dev, GF, 0, 4);
    assert_eq!(rd(&mut dev, GF, 4), FEATURE_X);
}

#[test]
fn queue_setup_and_activation() {
    let Setup { mut dev, state, .. } = setup();
    negotiate(
        &mut dev,
        features::VIRTIO_F_VERSION_1 | features::VIRTIO_F_EVENT_IDX,
    );
    wr(&mut dev, QSELECT, 0, 2);
    assert_eq!(rd(&mut dev, QSIZE, 2), 256);
    assert_eq!(rd(&mut dev, QVECTOR, 2), 0xffff);
    // Not a power of two, zero, above the maximum: ignored.
    for bad in [100, 0, 512] {
        wr(&mut dev, QSIZE, bad, 2);
        assert_eq!(rd(&mut dev, QSIZE, 2), 256);
    }
    setup_queue(&mut dev, 1, 32, 0x10000);
    assert_eq!(rd(&mut dev, QNOTIFYOFF, 2), 1);
    assert_eq!(rd(&mut dev, QDRIVER, 8), 0x11000);
    assert_eq!(rd(&mut dev, QDRIVER + 4, 4), 0);
    assert_eq!(rd(&mut dev, QENABLE, 2), 1);
    // An enabled queue's settings are frozen.
    wr(&mut dev, QSIZE, 16, 2);
    wr(&mut dev, QDESC, 0x20000, 8);
    assert_eq!(rd(&mut dev, QSIZE, 2), 32);
    assert_eq!(rd(&mut dev, QDESC, 8), 0x10000);
    assert!(state.lock().unwrap().activations.is_empty());

    driver_ok(&mut dev);
    assert!(dev.activated());
    assert_eq!(status(&mut dev) & status::DEVICE_NEEDS_RESET, 0);
    {
        let s = state.lock().unwrap();
        // Only the enabled queue, with event idx.
        assert_eq!(s.activations, [vec![(1, 32, true, 0x10000, 0)]]);
    }
    // A notification written through the BAR (no KVM ioeventfd) reaches the device's kick fd.
    wr(&mut dev, NOTIFY_OFFSET + 4, 1, 2);
    assert_eq!(state.lock().unwrap().kicks[0].read().unwrap(), 1);
    // Writing DRIVER_OK again does not re-activate.
    driver_ok(&mut dev);
    assert_eq!(state.lock().unwrap().activations.len(), 1);
}

#[test]
fn reset_clears_the_transport() {
    let Setup { mut dev, state, .. } = setup();
    negotiate(&mut dev, features::VIRTIO_F_VERSION_1);
    setup_queue(&mut dev, 0, 64, 0x10000);
    wr(&mut dev, QVECTOR, 1, 2);
    driver_ok(&mut dev);
    assert!(dev.activated());
    wr(&mut dev, STATUS, 0, 1);
    assert!(!dev.activated());
    assert_eq!(status(&mut dev), 0);
    assert_eq!(state.lock().unwrap().resets, 1);
    wr(&mut dev, QSELECT, 0, 2);
    assert_eq!(rd(&mut dev, QSIZE, 2), 256);
    assert_eq!(rd(&mut dev, QENABLE, 2), 0);
    assert_eq!(rd(&mut dev, QVECTOR, 2), 0xffff);
    assert_eq!(rd(&mut dev, QDESC, 8), 0);
    wr(&mut dev, GFSELECT, 0, 4);
    assert_eq!(rd(&mut dev, GF, 4), 0);
    // The driver can bring it up again.
    negotiate(&mut dev, features::VIRTIO_F_VERSION_1);
    setup_queue(&mut dev, 0, 64, 0x10000);
    driver_ok(&mut dev);
    assert_eq!(state.lock().unwrap().activations.len(), 2);
    assert_eq!(
        state.lock().unwrap().activations[1],
        [(0, 64, false, 0x10000, 0)]
    );
}

#[test]
fn device_config_passthrough() {
    let Setup { mut dev, state, .. } = setup();
    state.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
    assert_eq!(rd(&mut dev, DEVICE_CFG_OFFSET, 4), 0x0403_0201);
    assert_eq!(rd(&mut dev, DEVICE_CFG_OFFSET + 6, 2), 0x0807);
    assert_eq!(rd(&mut dev, DEVICE_CFG_OFFSET + 8, 4), 0);
    wr(&mut dev, DEVICE_CFG_OFFSET + 1, 0xaa, 1);
    assert_eq!(state.lock().unwrap().config[1], 0xaa);
}

#[test]
fn intx_path_and_isr_read_to_clear() {
    let Setup {
        mut dev, state, im, ..
    } = setup();
    negotiate(&mut dev, features::VIRTIO_F_VERSION_1);
    setup_queue(&mut dev, 0, 64, 0x10000);
    driver_ok(&mut dev);
    let int = state.lock().unwrap().interrupt.clone().unwrap();
    int.trigger(VirtioInterruptType::Queue(0)).unwrap();
    assert_eq!(im.intx_fired(), 1);
    int.trigger(VirtioInterruptType::Config).unwrap();
    assert_eq!(im.intx_fired(), 1);
    // A resample while the ISR is set re-asserts the line.
    dev.handle_intx_resample().unwrap();
    assert_eq!(im.intx_fired(), 1);
    assert_eq!(rd(&mut dev, ISR_OFFSET, 1), 3);
    assert_eq!(rd(&mut dev, ISR_OFFSET, 1), 0);
    dev.handle_intx_resample().unwrap();
    assert_eq!(im.intx_fired(), 0);
    // Command register INTx disable: the ISR is set, the line is not raised.
    dev.config_write(
        COMMAND_STATUS_REG,
        0,
        &crate::configuration::COMMAND_INTX_DISABLE.to_le_bytes(),
    );
    int.trigger(VirtioInterruptType::Queue(0)).unwrap();
    assert_eq!(im.intx_fired(), 0);
    assert_eq!(rd(&mut dev, ISR_OFFSET, 1), 1);
    assert!(int.trigger(VirtioInterruptType::Queue(9)).is_err());
}

#[test]
fn msix_path() {
    let Setup {
        mut dev, state, im, ..
    } = setup();
    enable_msix(&mut dev);
    program_vector(&mut dev, 0, 0xfee0_0000, 0x40);
    program_vector(&mut dev, 2, 0xfee0_1000, 0x41);
    assert_eq!(im.route(26), Some((0xfee0_1000, 0x41)));
    negotiate(&mut dev, features::VIRTIO_F_VERSION_1);
    wr(&mut dev, MSIX_CONFIG, 0, 2);
    assert_eq!(rd(&mut dev, MSIX_CONFIG, 2), 0);
    setup_queue(&mut dev, 1, 64, 0x10000);
    wr(&mut dev, QVECTOR, 2, 2);
    assert_eq!(rd(&mut dev, QVECTOR, 2), 2);
    // Out of range: reads back NO_VECTOR.
    wr(&mut dev, QSELECT, 0, 2);
    wr(&mut dev, QVECTOR, 3, 2);
    assert_eq!(rd(&mut dev, QVECTOR, 2), 0xffff);
    driver_ok(&mut dev);
    let int = state.lock().unwrap().interrupt.clone().unwrap();
    int.trigger(VirtioInterruptType::Queue(1)).unwrap();
    assert_eq!(im.fired(2), 1);
    int.trigger(VirtioInterruptType::Config).unwrap();
    assert_eq!(im.fired(0), 1);
    // Queue 0 has no vector: nothing, and no INTx either.
    int.trigger(VirtioInterruptType::Queue(0)).unwrap();
    assert_eq!(im.intx_fired(), 0);
    assert_eq!(rd(&mut dev, ISR_OFFSET, 1), 0);
    // Masking through the BAR makes the vector pending; the PBA shows it.
    wr(&mut dev, MSIX_TABLE_OFFSET + 2 * 16 + 12, 1, 4);
    int.trigger(VirtioInterruptType::Queue(1)).unwrap();
    assert_eq!(im.fired(2), 0);
    assert_eq!(rd(&mut dev, MSIX_PBA_OFFSET, 8), 0b100);
    wr(&mut dev, MSIX_TABLE_OFFSET + 2 * 16 + 12, 0, 4);
    assert_eq!(im.fired(2), 1);
}

#[test]
fn hostile_accesses() {
    let Setup { mut dev, state, .. } = setup();
    // Queue select out of range: reads 0, writes ignored.
    wr(&mut dev, QSELECT, 1000, 2);
    assert_eq!(rd(&mut dev, QSIZE, 2), 0);
    assert_eq!(rd(&mut dev, QVECTOR, 2), 0xffff);
    for f in [QSIZE, QVECTOR, QENABLE, QDESC] {
        wr(&mut dev, f, 1, 2);
    }
    assert_eq!(rd(&mut dev, QENABLE, 2), 0);
    // Read-only fields, accesses straddling fields, odd sizes, beyond the BAR.
    wr(&mut dev, NUM_QUEUES, 9, 2);
    assert_eq!(rd(&mut dev, NUM_QUEUES, 2), 2);
    wr(&mut dev, 0x11, 0xffff, 2);
    assert_eq!(rd(&mut dev, 0x11, 2), 0);
    dev.write(0, 0, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    dev.write(0, 0, &[]);
    let mut empty = [];
    dev.read(0, 0, &mut empty);
    for off in [
        0x7ffc,
        VIRTIO_BAR_SIZE,
        u64::MAX - 1,
        ISR_OFFSET + 1,
        0x3ffc,
    ] {
        wr(&mut dev, off, 0xffff_ffff, 4);
        assert_eq!(rd(&mut dev, off, 4), 0, "{off:#x}");
    }
    // A notification for a queue that does not exist.
    wr(&mut dev, NOTIFY_OFFSET + 8, 1, 2);
    // DRIVER_OK without FEATURES_OK: needs reset, and the config interrupt is raised.
    wr(
        &mut dev,
        STATUS,
        u64::from(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK),
        1,
    );
    assert!(!dev.activated());
    assert_ne!(status(&mut dev) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(rd(&mut dev, ISR_OFFSET, 1), u64::from(VIRTIO_ISR_CONFIG));
    // Rings outside guest memory or misaligned: activation refused.
    wr(&mut dev, STATUS, 0, 1);
    negotiate(&mut dev, features::VIRTIO_F_VERSION_1);
    setup_queue(&mut dev, 0, 64, 0xffff_0000_0000);
    driver_ok(&mut dev);
    assert!(!dev.activated());
    assert_ne!(status(&mut dev) & status::DEVICE_NEEDS_RESET, 0);
    wr(&mut dev, STATUS, 0, 1);
    negotiate(&mut dev, features::VIRTIO_F_VERSION_1);
    setup_queue(&mut dev, 0, 64, 0x10001);
    driver_ok(&mut dev);
    assert!(!dev.activated());
    // The device refusing to activate: NEEDS_RESET, and the error hook hears of it.
    let errors = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let seen = errors.clone();
    dev.set_error_hook(Arc::new(move |id: &str, reason: &str| {
        seen.lock().unwrap().push((id.into(), reason.into()));
    }));
    assert!(
        state.lock().unwrap().has_error_hook,
        "passed on to the device"
    );
    wr(&mut dev, STATUS, 0, 1);
    state.lock().unwrap().fail_activate = true;
    negotiate(&mut dev, features::VIRTIO_F_VERSION_1);
    setup_queue(&mut dev, 0, 64, 0x10000);
    driver_ok(&mut dev);
    assert!(!dev.activated());
    assert_ne!(status(&mut dev) & status::DEVICE_NEEDS_RESET, 0);
    let errors = errors.lock().unwrap().clone();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].0, "fake0");
    assert!(errors[0].1.contains("told to fail"), "{errors:?}");
}

#[test]
fn a_device_that_breaks_reports_needs_reset_until_the_driver_resets_it() {
    let Setup { mut dev, state, .. } = setup();
    negotiate(&mut dev, features::VIRTIO_F_VERSION_1);
    setup_queue(&mut dev, 0, 16, 0x1_0000);
    driver_ok(&mut dev);
    assert!(dev.activated());
    assert_eq!(status(&mut dev) & status::DEVICE_NEEDS_RESET, 0);
    state.lock().unwrap().broken = true;
    assert_ne!(status(&mut dev) & status::DEVICE_NEEDS_RESET, 0);
    // The driver resets the device: the bit goes away and the device can be set up again.
    wr(&mut dev, STATUS, 0, 1);
    assert_eq!(status(&mut dev), 0);
    negotiate(&mut dev, features::VIRTIO_F_VERSION_1);
    setup_queue(&mut dev, 0, 16, 0x1_0000);
    driver_ok(&mut dev);
    assert!(dev.activated());
    assert_eq!(status(&mut dev) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn guest_bar_moves_are_reported() {
    let Setup { mut dev, .. } = setup();
    dev.set_bar(0, 0x10_0000_0000).unwrap();
    dev.config_write(BAR0_REG, 0, &0xffff_ffffu32.to_le_bytes());
    assert_eq!(dev.take_bar_move(), None);
    dev.config_write(BAR0_REG, 0, &0u32.to_le_bytes());
    assert_eq!(dev.take_bar_move(), None);
    dev.config_write(BAR0_REG + 1, 0, &0x20u32.to_le_bytes());
    let m = dev.take_bar_move().unwrap();
    assert_eq!(
        (m.index, m.old_addr, m.new_addr),
        (0, 0x10_0000_0000, 0x20_0000_0000)
    );
    assert_eq!(dev.take_bar_move(), None);
}

#[test]
fn snapshot_and_restore() {
    let Setup { mut dev, state, .. } = setup();
    enable_msix(&mut dev);
    program_vector(&mut dev, 1, 0xfee0_0000, 0x40);
    negotiate(
        &mut dev,
        features::VIRTIO_F_VERSION_1 | features::VIRTIO_F_EVENT_IDX,
    );
    setup_queue(&mut dev, 0, 64, 0x10000);
    wr(&mut dev, QVECTOR, 1, 2);
    driver_ok(&mut dev);
    state.lock().unwrap().config = [9; 8];
    migration::Pausable::pause(&mut dev).unwrap();
    let section = dev.snapshot().unwrap();

    let Setup {
        dev: mut dev2,
        state: state2,
        im: im2,
    } = setup();
    dev2.restore(&section).unwrap();
    assert!(dev2.activated());
    assert_eq!(
        state2.lock().unwrap().activations,
        [vec![(0, 64, true, 0x10000, 0)]]
    );
    assert_eq!(
        state2.lock().unwrap().acked,
        features::VIRTIO_F_VERSION_1 | features::VIRTIO_F_EVENT_IDX
    );
    assert_eq!(im2.route(25), Some((0xfee0_0000, 0x40)));
    wr(&mut dev2, QSELECT, 0, 2);
    assert_eq!(rd(&mut dev2, QVECTOR, 2), 1);
    let int = state2.lock().unwrap().interrupt.clone().unwrap();
    int.trigger(VirtioInterruptType::Queue(0)).unwrap();
    assert_eq!(im2.fired(1), 1);

    // Truncated or foreign sections are rejected.
    let mut short = section.clone();
    short.data.truncate(short.data.len() - 1);
    let mut fresh = setup().dev;
    assert!(fresh.restore(&short).is_err());
    // Nothing of a refused section is applied: the transport is as it was.
    assert!(!fresh.activated());
    assert_eq!(status(&mut fresh), 0);
    assert_eq!(section.id, "virtio-pci/fake0");
    let mut newer = section.clone();
    newer.version += 1;
    assert!(matches!(
        setup().dev.restore(&newer),
        Err(migration::StateError::Version { .. })
    ));
    let mut other = section.clone();
    other.id = "other".into();
    assert!(setup().dev.restore(&other).is_err());
}

/// Device addresses `[IOVA_BASE, IOVA_BASE + WINDOW)` map to guest-physical `GPA_BASE..`.
#[derive(Debug)]
struct WindowAccess;

const IOVA_BASE: u64 = 0x40_0000_0000;
const GPA_BASE: u64 = 0x8_0000;
const WINDOW: u64 = 0x4000;

impl AccessPlatform for WindowAccess {
    fn translate(
        &self,
        addr: u64,
        len: u64,
        access: DmaAccess,
        out: &mut Vec<(GuestAddress, u64)>,
    ) -> Result<(), DmaFault> {
        if addr < IOVA_BASE || addr + len > IOVA_BASE + WINDOW {
            return Err(DmaFault { addr, access });
        }
        out.push((GuestAddress(GPA_BASE + addr - IOVA_BASE), len));
        Ok(())
    }
}

#[test]
fn device_behind_iommu_needs_access_platform_and_gets_translated_rings() {
    let Setup { mut dev, state, .. } = setup();
    dev.set_access_platform(Arc::new(WindowAccess));
    assert!(dev.behind_iommu());
    // A driver that refuses ACCESS_PLATFORM cannot set FEATURES_OK.
    negotiate(&mut dev, features::VIRTIO_F_VERSION_1);
    assert_eq!(status(&mut dev) & status::FEATURES_OK, 0);
    wr(&mut dev, STATUS, 0, 1);
    negotiate(
        &mut dev,
        features::VIRTIO_F_VERSION_1 | features::VIRTIO_F_ACCESS_PLATFORM,
    );
    assert_ne!(status(&mut dev) & status::FEATURES_OK, 0);
    // Rings at device addresses: the device gets their guest-physical addresses.
    setup_queue(&mut dev, 0, 16, IOVA_BASE);
    driver_ok(&mut dev);
    assert!(dev.activated());
    let s = state.lock().unwrap();
    assert_eq!(s.activations.len(), 1);
    assert_eq!(
        s.activations[0][0].3, GPA_BASE,
        "translated descriptor table"
    );
    assert_eq!(s.access, [true]);
}

#[test]
fn unmapped_ring_puts_the_device_in_needs_reset() {
    let Setup { mut dev, state, .. } = setup();
    dev.set_access_platform(Arc::new(WindowAccess));
    negotiate(
        &mut dev,
        features::VIRTIO_F_VERSION_1 | features::VIRTIO_F_ACCESS_PLATFORM,
    );
    // The used ring (base + 0x2000, 6 + 8 * 256 bytes) runs past the end of the window.
    setup_queue(&mut dev, 0, 256, IOVA_BASE + 0x1800);
    driver_ok(&mut dev);
    assert!(!dev.activated());
    assert_ne!(status(&mut dev) & status::DEVICE_NEEDS_RESET, 0);
    assert!(state.lock().unwrap().activations.is_empty());
}

#[test]
fn device_without_iommu_ignores_access_platform() {
    let Setup { mut dev, state, .. } = setup();
    negotiate(
        &mut dev,
        features::VIRTIO_F_VERSION_1 | features::VIRTIO_F_ACCESS_PLATFORM,
    );
    setup_queue(&mut dev, 0, 16, 0x1_0000);
    driver_ok(&mut dev);
    let s = state.lock().unwrap();
    assert_eq!(s.activations[0][0].3, 0x1_0000);
    assert_eq!(s.access, [false]);
}
