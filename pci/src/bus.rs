//! PCI bus 0: up to 32 single-function devices, the host bridge in slot 0.

use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::configuration::BarMove;
use crate::device::PciDevice;
use crate::host_bridge::PciHostBridge;

/// Device slots on a bus.
pub const NUM_SLOTS: u8 = 32;
/// Functions per device.
pub const NUM_FUNCTIONS: u8 = 8;
/// Slot of the host bridge.
pub const HOST_BRIDGE_SLOT: u8 = 0;

/// A shared PCI device.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Called with `(slot, move)` when a guest configuration write moved a BAR of the device in
/// `slot`. It runs on the vCPU thread that made the write, with the [`PciBus`] locked (it must not
/// lock the bus again) but not the device.
pub type BarMoveHandler = Box<dyn Fn(u8, BarMove) + Send>;

/// Errors from [`PciBus`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciBusError {
    /// The requested slot already holds a device.
    #[error("PCI slot {0} is already in use")]
    SlotTaken(u8),
    /// Every slot is in use.
    #[error("no free PCI slot")]
    NoFreeSlot,
    /// Slot 0 belongs to the host bridge.
    #[error("PCI slot 0 is reserved for the host bridge")]
    SlotReserved,
    /// Slot number out of range.
    #[error("PCI slot {0} is out of range (0..32)")]
    InvalidSlot(u8),
    /// No device in the slot.
    #[error("PCI slot {0} is empty")]
    EmptySlot(u8),
}

/// Bus 0 of PCI segment 0. Only function 0 of each slot is populated.
pub struct PciBus {
    slots: Vec<Option<SharedPciDevice>>,
    host_bridge: Arc<Mutex<PciHostBridge>>,
    bar_move_handler: Option<BarMoveHandler>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with a [`PciHostBridge`] in slot 0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<SharedPciDevice>> = vec![None; NUM_SLOTS as usize];
        let host_bridge = Arc::new(Mutex::new(PciHostBridge::new()));
        slots[HOST_BRIDGE_SLOT as usize] = Some(host_bridge.clone());
        Self {
            slots,
            host_bridge,
            bar_move_handler: None,
        }
    }

    /// The host bridge in slot 0 (a component of the VM: its state is saved and restored).
    pub fn host_bridge(&self) -> Arc<Mutex<PciHostBridge>> {
        self.host_bridge.clone()
    }

    /// Install the callback that follows BAR moves (the VMM moves the device's bus range and
    /// ioeventfds). Without one, moves are only logged.
    pub fn set_bar_move_handler(&mut self, handler: BarMoveHandler) {
        self.bar_move_handler = Some(handler);
    }

    /// Plug `device` into `slot`, or into the lowest free slot when `None`; returns the slot.
    pub fn add_device(
        &mut self,
        slot: Option<u8>,
        device: SharedPciDevice,
    ) -> Result<u8, PciBusError> {
        let slot = match slot {
            Some(HOST_BRIDGE_SLOT) => return Err(PciBusError::SlotReserved),
            Some(s) if s >= NUM_SLOTS => return Err(PciBusError::InvalidSlot(s)),
            Some(s) if self.slots[s as usize].is_some() => return Err(PciBusError::SlotTaken(s)),
            Some(s) => s,
            None => self.free_slot().ok_or(PciBusError::NoFreeSlot)?,
        };
        self.slots[slot as usize] = Some(device);
        Ok(slot)
    }

    /// The lowest free slot, if any.
    pub fn free_slot(&self) -> Option<u8> {
        (1..NUM_SLOTS).find(|&s| self.slots[s as usize].is_none())
    }

    /// Unplug the device in `slot` (not the host bridge) and return it.
    pub fn remove_device(&mut self, slot: u8) -> Result<SharedPciDevice, PciBusError> {
        match slot {
            HOST_BRIDGE_SLOT => Err(PciBusError::SlotReserved),
            s if s >= NUM_SLOTS => Err(PciBusError::InvalidSlot(s)),
            s => self.slots[s as usize]
                .take()
                .ok_or(PciBusError::EmptySlot(s)),
        }
    }

    /// The device in `slot`, if any.
    pub fn device(&self, slot: u8) -> Option<SharedPciDevice> {
        self.slots.get(slot as usize).cloned().flatten()
    }

    /// Occupied slots and their devices, in slot order (the host bridge first).
    pub fn devices(&self) -> impl Iterator<Item = (u8, SharedPciDevice)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.clone().map(|d| (i as u8, d)))
    }

    fn lookup(&self, bus: u8, dev: u8, func: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(dev as usize)?.as_ref()
    }

    /// Read register `reg_idx` of `bus:dev.func`; all ones when there is no such function.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, reg_idx: usize) -> u32 {
        match self.lookup(bus, dev, func) {
            Some(d) => d
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_read(reg_idx),
            None => 0xFFFF_FFFF,
        }
    }

    /// Write `data` at byte `offset` within register `reg_idx` of `bus:dev.func`; ignored when
    /// there is no such function.
    pub fn config_write(
        &self,
        bus: u8,
        dev: u8,
        func: u8,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) {
        let Some(d) = self.lookup(bus, dev, func) else {
            return;
        };
        let moved = {
            let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
            d.config_write(reg_idx, offset, data);
            d.take_bar_move()
        };
        if let Some(m) = moved {
            log::debug!(
                "PCI 00:{dev:02x}.0: BAR {} moved from {:#x} to {:#x}",
                m.index,
                m.old_addr,
                m.new_addr
            );
            if let Some(h) = &self.bar_move_handler {
                h(dev, m);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::configuration::{BarKind, ConfigSpaceSize, PciConfiguration, PciHeader, BAR0_REG};

    /// A plain device for tests: a configuration space with the given ids.
    pub(crate) struct TestDevice(pub PciConfiguration, pub Option<BarMove>);

    impl TestDevice {
        pub(crate) fn shared(vendor: u16, device: u16) -> SharedPciDevice {
            let header = PciHeader {
                vendor_id: vendor,
                device_id: device,
                ..Default::default()
            };
            let mut config = PciConfiguration::new(&header, ConfigSpaceSize::Legacy);
            config
                .add_bar(0, 0x1000, BarKind::Io, 0x1000)
                .expect("valid BAR");
            Arc::new(Mutex::new(TestDevice(config, None)))
        }
    }

    impl PciDevice for TestDevice {
        fn config_read(&mut self, reg_idx: usize) -> u32 {
            self.0.read_reg(reg_idx)
        }
        fn config_write(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
            self.1 = self.0.write_reg(reg_idx, offset, data);
        }
        fn id(&self) -> String {
            "test".into()
        }
        fn take_bar_move(&mut self) -> Option<BarMove> {
            self.1.take()
        }
    }

    #[test]
    fn slots_and_errors() {
        let mut bus = PciBus::new();
        assert_eq!(bus.config_read(0, 0, 0, 0), 0x0008_1b36);
        assert_eq!(
            bus.add_device(Some(0), TestDevice::shared(1, 2)),
            Err(PciBusError::SlotReserved)
        );
        assert_eq!(
            bus.add_device(Some(32), TestDevice::shared(1, 2)),
            Err(PciBusError::InvalidSlot(32))
        );
        assert_eq!(bus.add_device(Some(3), TestDevice::shared(1, 2)), Ok(3));
        assert_eq!(
            bus.add_device(Some(3), TestDevice::shared(1, 2)),
            Err(PciBusError::SlotTaken(3))
        );
        assert_eq!(bus.add_device(None, TestDevice::shared(1, 2)), Ok(1));
        assert_eq!(bus.add_device(None, TestDevice::shared(1, 2)), Ok(2));
        for s in 4..32 {
            assert_eq!(bus.add_device(None, TestDevice::shared(1, 2)), Ok(s));
        }
        assert_eq!(
            bus.add_device(None, TestDevice::shared(1, 2)),
            Err(PciBusError::NoFreeSlot)
        );
        assert_eq!(bus.devices().count(), 32);
        assert!(bus.remove_device(5).is_ok());
        assert_eq!(bus.remove_device(5).err(), Some(PciBusError::EmptySlot(5)));
        assert_eq!(bus.remove_device(0).err(), Some(PciBusError::SlotReserved));
        assert_eq!(bus.add_device(None, TestDevice::shared(1, 2)), Ok(5));
    }

    #[test]
    fn absent_functions_read_all_ones() {
        let mut bus = PciBus::new();
        bus.add_device(Some(1), TestDevice::shared(0x1af4, 0x1042))
            .unwrap();
        assert_eq!(bus.config_read(0, 1, 0, 0), 0x1042_1af4);
        assert_eq!(bus.config_read(0, 2, 0, 0), 0xFFFF_FFFF);
        assert_eq!(bus.config_read(0, 1, 1, 0), 0xFFFF_FFFF);
        assert_eq!(bus.config_read(1, 1, 0, 0), 0xFFFF_FFFF);
        assert_eq!(bus.config_read(0, 200, 0, 0), 0xFFFF_FFFF);
        bus.config_write(0, 2, 0, 1, 0, &[0xff]);
        bus.config_write(0, 1, 0, 1, 0, &[0x02]);
        assert_eq!(bus.config_read(0, 1, 0, 1), 0x2);
    }

    #[test]
    fn bar_moves_reach_the_handler() {
        let mut bus = PciBus::new();
        bus.add_device(Some(3), TestDevice::shared(1, 2)).unwrap();
        // Without a handler a move is only logged.
        bus.config_write(0, 3, 0, BAR0_REG, 0, &0x2000u32.to_le_bytes());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        bus.set_bar_move_handler(Box::new(move |slot, m| {
            s.lock().unwrap().push((slot, m.old_addr, m.new_addr))
        }));
        // Sizing and restoring is not a move; a new address is.
        bus.config_write(0, 3, 0, BAR0_REG, 0, &0xffff_ffffu32.to_le_bytes());
        bus.config_write(0, 3, 0, BAR0_REG, 0, &0x2000u32.to_le_bytes());
        bus.config_write(0, 3, 0, BAR0_REG, 0, &0x3000u32.to_le_bytes());
        assert_eq!(*seen.lock().unwrap(), [(3, 0x2000, 0x3000)]);
    }
}
