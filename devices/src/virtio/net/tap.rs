//! The TAP backend: a Linux TAP interface opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, so
//! every read and write carries a 12-byte `virtio_net_hdr_v1` in front of the Ethernet frame.
//!
//! skiff opens (or attaches to) the TAP but does not configure it: bringing the interface up,
//! addressing and bridging it are up to the user.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{NetBackend, NetError, VNET_HDR_LEN};

/// Interface flags skiff needs on a TAP file.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ifreq_with_name(name: &str) -> Result<libc::ifreq, NetError> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() >= libc::IFNAMSIZ
        || bytes.contains(&0)
        || bytes.contains(&b'/')
    {
        return Err(NetError::InvalidTapName {
            name: name.to_string(),
        });
    }
    // SAFETY: ifreq is plain old data (a name array and a union of integers/structs); all-zero is
    // a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(ifr)
}

fn ifr_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Tap {
    /// Open the TAP interface `name`, creating it when it does not exist (a TAP created this way
    /// disappears when skiff closes it). Needs CAP_NET_ADMIN unless the TAP already exists and
    /// belongs to the calling user.
    pub fn open(name: &str) -> Result<Self, NetError> {
        let mut ifr = ifreq_with_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EPERM) => NetError::TapPermission {
                    name: name.to_string(),
                },
                _ => NetError::TunDevice { source: e },
            })?;
        ifr.ifr_ifru.ifru_flags = TAP_FLAGS as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is; the fd is ours.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => NetError::TapPermission {
                    name: name.to_string(),
                },
                Some(libc::EBUSY) => NetError::TapBusy {
                    name: name.to_string(),
                },
                _ => NetError::TapIoctl {
                    tap: name.to_string(),
                    op: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let tap = Self {
            file,
            name: ifr_name(&ifr),
        };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// Use an already open TAP file descriptor (inherited from a parent that created the TAP).
    /// The descriptor is duplicated: the caller keeps `fd` and may close it afterwards. It must
    /// have been attached with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; it is made non-blocking (a
    /// flag it shares with `fd`).
    pub fn from_fd(fd: RawFd) -> Result<Self, NetError> {
        // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor number; an invalid one fails with EBADF.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            return Err(NetError::TapFd {
                fd,
                reason: format!(
                    "not an open file descriptor: {}",
                    io::Error::last_os_error()
                ),
            });
        }
        // SAFETY: `dup` is a fresh descriptor that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(dup) });
        // SAFETY: ifreq is plain old data; all-zero is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one `struct ifreq`; the fd is ours.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut ifr) };
        if r < 0 {
            return Err(NetError::TapFd {
                fd,
                reason: format!(
                    "not an attached TUN/TAP descriptor (TUNGETIFF: {})",
                    io::Error::last_os_error()
                ),
            });
        }
        // SAFETY: TUNGETIFF filled in the flags member of the union.
        let flags = libc::c_int::from(unsafe { ifr.ifr_ifru.ifru_flags }) & 0xffff;
        let name = ifr_name(&ifr);
        if flags & TAP_FLAGS != TAP_FLAGS {
            let mut missing = Vec::new();
            for (f, n) in [
                (libc::IFF_TAP, "IFF_TAP"),
                (libc::IFF_NO_PI, "IFF_NO_PI"),
                (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
            ] {
                if flags & f == 0 {
                    missing.push(n);
                }
            }
            return Err(NetError::TapFd {
                fd,
                reason: format!("TAP {name} was opened without {}", missing.join(", ")),
            });
        }
        // SAFETY: F_GETFL/F_SETFL on our own descriptor.
        let r = unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl < 0 {
                fl
            } else {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
            }
        };
        if r < 0 {
            return Err(NetError::TapIoctl {
                tap: name,
                op: "F_SETFL O_NONBLOCK",
                source: io::Error::last_os_error(),
            });
        }
        let tap = Self { file, name };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn set_vnet_hdr_size(&self) -> Result<(), NetError> {
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int; the fd is ours.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if r < 0 {
            return Err(NetError::TapIoctl {
                tap: self.name.clone(),
                op: "TUNSETVNETHDRSZ",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    /// `TUNSETOFFLOAD` with `TUN_F_*` flags: which offloaded (partial checksum, GSO) frames the TAP
    /// may hand to the guest.
    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is ours.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                tun_flags as libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("TAP {}", self.name)
    }
}

/// Whether `/dev/net/tun` can be opened (tests and benchmarks skip TAP cases when not).
pub fn tun_available() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .is_ok()
}
