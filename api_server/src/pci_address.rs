//! [`PciAddress`]: where a device sits on the VM's PCI bus, as written in the configuration
//! (`"0000:00:05.0"`) so that a restored or migrated VM puts every device back where the guest
//! knew it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Number of device slots on bus 0.
pub const PCI_SLOTS: u8 = 32;

/// A device's address on PCI segment 0, bus 0, function 0 — the VM's only bus. Slot 0 is the
/// host bridge's and cannot be given to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    slot: u8,
}

impl PciAddress {
    /// The address of function 0 of `slot` (1..32).
    pub fn new(slot: u8) -> Result<Self, String> {
        match slot {
            0 => Err("slot 0 is the PCI host bridge's".into()),
            s if s >= PCI_SLOTS => Err(format!("slot {s:#x} is out of range (1..0x1f)")),
            s => Ok(Self { slot: s }),
        }
    }

    /// The slot (device number) on bus 0.
    pub fn slot(self) -> u8 {
        self.slot
    }

    /// The PCI requester id (bus << 8 | device << 3 | function), the virtio-iommu endpoint id.
    pub fn requester_id(self) -> u32 {
        u32::from(self.slot) << 3
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0000:00:{:02x}.0", self.slot)
    }
}

impl FromStr for PciAddress {
    type Err = String;

    /// `SSSS:BB:DD.F` or `BB:DD.F`, hexadecimal; only segment 0, bus 0, function 0 exist.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("PCI address {s:?}: expected 0000:00:DD.0 (hexadecimal slot DD)");
        let (rest, func) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (segment, bus, dev) = match parts.as_slice() {
            [seg, bus, dev] => (*seg, *bus, *dev),
            [bus, dev] => ("0", *bus, *dev),
            _ => return Err(bad()),
        };
        let hex = |v: &str, max_len: usize| {
            if v.is_empty() || v.len() > max_len {
                return Err(bad());
            }
            u32::from_str_radix(v, 16).map_err(|_| bad())
        };
        let (segment, bus, dev, func) =
            (hex(segment, 4)?, hex(bus, 2)?, hex(dev, 2)?, hex(func, 1)?);
        if segment != 0 || bus != 0 {
            return Err(format!(
                "PCI address {s:?}: the VM has one PCI bus, 0000:00 (segment 0, bus 0)"
            ));
        }
        if func != 0 {
            return Err(format!(
                "PCI address {s:?}: devices are single-function (function 0)"
            ));
        }
        let slot = u8::try_from(dev).map_err(|_| bad())?;
        Self::new(slot).map_err(|e| format!("PCI address {s:?}: {e}"))
    }
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        let a: PciAddress = "0000:00:05.0".parse().unwrap();
        assert_eq!(a.slot(), 5);
        assert_eq!(a.to_string(), "0000:00:05.0");
        assert_eq!(a.requester_id(), 0x28);
        assert_eq!("00:1f.0".parse::<PciAddress>().unwrap().slot(), 31);
        for bad in [
            "",
            "5",
            "0000:00:00.0",
            "0000:00:20.0",
            "0000:01:05.0",
            "0001:00:05.0",
            "0000:00:05.1",
            "0000:00:5g.0",
            "00000:00:05.0",
            "0000:00:005.0",
            "0000:00:05.",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad:?} was accepted");
        }
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, "\"0000:00:05.0\"");
        assert_eq!(serde_json::from_str::<PciAddress>(&json).unwrap(), a);
        assert!(serde_json::from_str::<PciAddress>("\"0000:00:00.0\"").is_err());
    }
}
