//! The Virtual I/O Translation table (VIOT, ACPI 6.4 §5.2.32): which endpoints sit behind which
//! paravirtualised IOMMU.
//!
//! Layout: the 36-byte header, `node_count` (u16 at 36), `node_offset` (u16 at 38, from the start
//! of the table), 8 reserved bytes, then the nodes. Every node starts with `type` (u8), a reserved
//! byte and `length` (u16). Nodes refer to each other by their offset from the start of the table.

use alloc::vec::Vec;
use core::fmt;

use super::Table;
use crate::pci::Bdf;

/// Node type: a range of PCI endpoints.
pub const NODE_PCI_RANGE: u8 = 1;
/// Node type: a single MMIO endpoint.
pub const NODE_MMIO: u8 = 2;
/// Node type: a virtio-iommu on PCI.
pub const NODE_VIRTIO_IOMMU_PCI: u8 = 3;
/// Node type: a virtio-iommu on virtio-mmio.
pub const NODE_VIRTIO_IOMMU_MMIO: u8 = 4;

/// A 16-bit PCI requester id split into bus, device and function.
pub fn bdf_of(id: u16) -> Bdf {
    Bdf {
        bus: (id >> 8) as u8,
        dev: ((id >> 3) & 0x1F) as u8,
        func: (id & 7) as u8,
    }
}

/// The 16-bit requester id of `bdf`.
pub fn id_of(bdf: Bdf) -> u16 {
    u16::from(bdf.bus) << 8 | u16::from(bdf.dev) << 3 | u16::from(bdf.func)
}

/// One VIOT node, with the offset it has in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// Type 1: PCI functions `bdf_start..=bdf_end` of segments `segment_start..=segment_end`
    /// are endpoints `endpoint_start + (bdf - bdf_start)` of the IOMMU at `output_node`.
    PciRange {
        /// Offset of this node.
        offset: u16,
        /// Endpoint id of the first function.
        endpoint_start: u32,
        /// First segment.
        segment_start: u16,
        /// Last segment.
        segment_end: u16,
        /// First requester id.
        bdf_start: u16,
        /// Last requester id.
        bdf_end: u16,
        /// Offset of the IOMMU node.
        output_node: u16,
    },
    /// Type 2: one MMIO endpoint.
    Mmio {
        /// Offset of this node.
        offset: u16,
        /// Endpoint id.
        endpoint: u32,
        /// Base address of the device.
        base: u64,
        /// Offset of the IOMMU node.
        output_node: u16,
    },
    /// Type 3: a virtio-iommu PCI function.
    VirtioIommuPci {
        /// Offset of this node.
        offset: u16,
        /// PCI segment.
        segment: u16,
        /// Requester id of the IOMMU function.
        bdf: u16,
    },
    /// Type 4: a virtio-mmio virtio-iommu.
    VirtioIommuMmio {
        /// Offset of this node.
        offset: u16,
        /// Base address.
        base: u64,
    },
    /// A node of another type (skipped).
    Unknown {
        /// Offset of this node.
        offset: u16,
        /// Its type.
        kind: u8,
        /// Its length.
        length: u16,
    },
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Node::PciRange {
                offset,
                endpoint_start,
                segment_start,
                segment_end,
                bdf_start,
                bdf_end,
                output_node,
            } => write!(
                f,
                "node @{offset:#x} pci-range endpoints {endpoint_start:#x}.. bdf {}-{} segments {segment_start}-{segment_end} -> node @{output_node:#x}",
                bdf_of(bdf_start),
                bdf_of(bdf_end)
            ),
            Node::Mmio {
                offset,
                endpoint,
                base,
                output_node,
            } => write!(
                f,
                "node @{offset:#x} mmio endpoint {endpoint:#x} base {base:#x} -> node @{output_node:#x}"
            ),
            Node::VirtioIommuPci {
                offset,
                segment,
                bdf,
            } => write!(
                f,
                "node @{offset:#x} virtio-iommu-pci {segment:04x}:{}",
                bdf_of(bdf)
            ),
            Node::VirtioIommuMmio { offset, base } => {
                write!(f, "node @{offset:#x} virtio-iommu-mmio base {base:#x}")
            }
            Node::Unknown {
                offset,
                kind,
                length,
            } => write!(f, "node @{offset:#x} type {kind} length {length} (unknown)"),
        }
    }
}

/// The parsed table.
#[derive(Clone, Debug, Default)]
pub struct Viot {
    /// `node_count` from the header.
    pub node_count: u16,
    /// Every node that could be read, in table order.
    pub nodes: Vec<Node>,
    /// Problems found while parsing (a node running past the end, a bad length, ...).
    pub errors: Vec<&'static str>,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or_default())
}

impl Viot {
    /// Parse a VIOT table.
    pub fn parse(t: &Table) -> Viot {
        let b = t.bytes();
        let mut v = Viot::default();
        if b.len() < 48 {
            v.errors.push("table shorter than its 48-byte header");
            return v;
        }
        v.node_count = u16_at(b, 36);
        let mut off = usize::from(u16_at(b, 38));
        for _ in 0..v.node_count {
            if off + 4 > b.len() {
                v.errors.push("a node starts past the end of the table");
                break;
            }
            let kind = b[off];
            let length = u16_at(b, off + 2);
            let len = usize::from(length);
            if len < 4 || off + len > b.len() {
                v.errors
                    .push("a node's length runs past the end of the table");
                break;
            }
            let n = &b[off..off + len];
            let offset = off as u16;
            let node = match kind {
                NODE_PCI_RANGE if len >= 24 => Node::PciRange {
                    offset,
                    endpoint_start: u32_at(n, 4),
                    segment_start: u16_at(n, 8),
                    segment_end: u16_at(n, 10),
                    bdf_start: u16_at(n, 12),
                    bdf_end: u16_at(n, 14),
                    output_node: u16_at(n, 16),
                },
                NODE_MMIO if len >= 24 => Node::Mmio {
                    offset,
                    endpoint: u32_at(n, 4),
                    base: u64_at(n, 8),
                    output_node: u16_at(n, 16),
                },
                NODE_VIRTIO_IOMMU_PCI if len >= 16 => Node::VirtioIommuPci {
                    offset,
                    segment: u16_at(n, 4),
                    bdf: u16_at(n, 6),
                },
                NODE_VIRTIO_IOMMU_MMIO if len >= 16 => Node::VirtioIommuMmio {
                    offset,
                    base: u64_at(n, 8),
                },
                NODE_PCI_RANGE | NODE_MMIO | NODE_VIRTIO_IOMMU_PCI | NODE_VIRTIO_IOMMU_MMIO => {
                    v.errors.push("a node is shorter than its type's layout");
                    Node::Unknown {
                        offset,
                        kind,
                        length,
                    }
                }
                _ => Node::Unknown {
                    offset,
                    kind,
                    length,
                },
            };
            v.nodes.push(node);
            off += len;
        }
        v
    }

    /// The virtio-iommu PCI nodes: `(node offset, segment, BDF)`.
    pub fn pci_iommus(&self) -> Vec<(u16, u16, Bdf)> {
        self.nodes
            .iter()
            .filter_map(|n| match *n {
                Node::VirtioIommuPci {
                    offset,
                    segment,
                    bdf,
                } => Some((offset, segment, bdf_of(bdf))),
                _ => None,
            })
            .collect()
    }

    /// The endpoint id of PCI function `bdf` in `segment` behind the IOMMU node at `iommu`, if a
    /// PCI range node says it is behind it.
    pub fn endpoint_of(&self, iommu: u16, segment: u16, bdf: Bdf) -> Option<u32> {
        let id = id_of(bdf);
        self.nodes.iter().find_map(|n| match *n {
            Node::PciRange {
                endpoint_start,
                segment_start,
                segment_end,
                bdf_start,
                bdf_end,
                output_node,
                ..
            } if output_node == iommu
                && (segment_start..=segment_end).contains(&segment)
                && (bdf_start..=bdf_end).contains(&id) =>
            {
                endpoint_start.checked_add(u32::from(id - bdf_start))
            }
            _ => None,
        })
    }
}
