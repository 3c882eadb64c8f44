//! Tests of the kernel migration uAPI and IOMMU dirty tracking that run without VFIO: the ioctl
//! numbers and argument layouts against linux/vfio.h and linux/iommufd.h, the data fd handling
//! on stand-in fds, the range and bitmap arithmetic; and one test against a real device when the
//! host has one.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::mem::{align_of, offset_of, size_of};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use iommufd_bindings::iommufd::{
    iommu_hwpt_alloc, iommu_hwpt_get_dirty_bitmap, iommu_hwpt_set_dirty_tracking,
    iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
    iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
    iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
    IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING, IOMMUFD_TYPE,
};
use vfio_bindings::bindings::vfio::*;

use super::iommufd_dirty::{
    dirty_hwpt_alloc, get_dirty_bitmap_arg, set_dirty_tracking_arg, IOMMU_HWPT_GET_DIRTY_BITMAP,
    IOMMU_HWPT_SET_DIRTY_TRACKING,
};
use super::migration::{
    bitmap_words, check_report, fit_logging_ranges, has_data_session, read_mig_data, report_pieces,
    write_mig_data, Feature, MigSession, MAX_LOGGING_RANGES, MAX_REPORT_BITMAP_BYTES,
    VFIO_DEVICE_FEATURE, VFIO_MIG_GET_PRECOPY_INFO,
};
use crate::vfio::mig_backend::{self, DmaDirtyReport};
use crate::vfio::sysfs::{BindOptions, SysfsRoot};
use crate::vfio::{VfioBackend, VfioError};

/// `_IO(type, nr)`: no direction, no size (asm-generic/ioctl.h).
fn io_nr(ty: u32, nr: u32) -> libc::c_ulong {
    libc::c_ulong::from((ty << 8) | nr)
}

#[test]
fn ioctl_numbers_match_the_uapi_headers() {
    // linux/vfio.h: VFIO_TYPE ';' (0x3b), VFIO_BASE 100.
    assert_eq!(VFIO_TYPE, b';');
    assert_eq!(VFIO_BASE, 100);
    assert_eq!(VFIO_DEVICE_FEATURE(), io_nr(0x3b, 117));
    assert_eq!(VFIO_DEVICE_FEATURE(), 0x3b75);
    assert_eq!(VFIO_MIG_GET_PRECOPY_INFO(), io_nr(0x3b, 121));
    assert_eq!(VFIO_MIG_GET_PRECOPY_INFO(), 0x3b79);
    // linux/iommufd.h: IOMMUFD_TYPE ';', IOMMUFD_CMD_BASE 0x80, SET_DIRTY_TRACKING the 12th
    // command after it, GET_DIRTY_BITMAP the 13th.
    assert_eq!(IOMMUFD_TYPE, b';');
    assert_eq!(IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING, 0x8b);
    assert_eq!(IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP, 0x8c);
    assert_eq!(IOMMU_HWPT_SET_DIRTY_TRACKING(), 0x3b8b);
    assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP(), 0x3b8c);
}

#[test]
fn feature_constants_match_linux_vfio_h() {
    assert_eq!(VFIO_DEVICE_FEATURE_MASK, 0xffff);
    assert_eq!(VFIO_DEVICE_FEATURE_GET, 1 << 16);
    assert_eq!(VFIO_DEVICE_FEATURE_SET, 1 << 17);
    assert_eq!(VFIO_DEVICE_FEATURE_PROBE, 1 << 18);
    assert_eq!(VFIO_DEVICE_FEATURE_MIGRATION, 1);
    assert_eq!(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 2);
    assert_eq!(VFIO_DEVICE_FEATURE_DMA_LOGGING_START, 6);
    assert_eq!(VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, 7);
    assert_eq!(VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, 8);
    assert_eq!(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, 9);
    assert_eq!(
        u64::from(VFIO_MIGRATION_STOP_COPY),
        mig_backend::VFIO_MIGRATION_STOP_COPY
    );
    assert_eq!(
        u64::from(VFIO_MIGRATION_P2P),
        mig_backend::VFIO_MIGRATION_P2P
    );
    assert_eq!(
        u64::from(VFIO_MIGRATION_PRE_COPY),
        mig_backend::VFIO_MIGRATION_PRE_COPY
    );
    // enum vfio_device_mig_state.
    let states = [
        vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR,
        vfio_device_mig_state_VFIO_DEVICE_STATE_STOP,
        vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
        vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
        vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING,
        vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P,
        vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY,
        vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P,
    ];
    assert_eq!(states, [0, 1, 2, 3, 4, 5, 6, 7]);
    // The saving group and RESUMING have a data session, nothing else does.
    let with_fd: Vec<u32> = (0..8).filter(|s| has_data_session(*s)).collect();
    assert_eq!(with_fd, vec![3, 4, 6, 7]);
}

#[test]
fn vfio_argument_layouts_match_linux_vfio_h() {
    // struct vfio_device_feature { u32 argsz; u32 flags; u8 data[]; }
    assert_eq!(size_of::<vfio_device_feature>(), 8);
    assert_eq!(offset_of!(vfio_device_feature, argsz), 0);
    assert_eq!(offset_of!(vfio_device_feature, flags), 4);
    assert_eq!(offset_of!(vfio_device_feature, data), 8);
    // struct vfio_device_feature_mig_state { u32 device_state; s32 data_fd; }
    assert_eq!(size_of::<vfio_device_feature_mig_state>(), 8);
    assert_eq!(offset_of!(vfio_device_feature_mig_state, device_state), 0);
    assert_eq!(offset_of!(vfio_device_feature_mig_state, data_fd), 4);
    // struct vfio_device_feature_migration { aligned_u64 flags; }
    assert_eq!(size_of::<vfio_device_feature_migration>(), 8);
    assert_eq!(align_of::<vfio_device_feature_migration>(), 8);
    // struct vfio_device_feature_mig_data_size { aligned_u64 stop_copy_length; }
    assert_eq!(size_of::<vfio_device_feature_mig_data_size>(), 8);
    // struct vfio_precopy_info { u32 argsz; u32 flags; aligned_u64 initial_bytes, dirty_bytes; }
    assert_eq!(size_of::<vfio_precopy_info>(), 24);
    assert_eq!(offset_of!(vfio_precopy_info, argsz), 0);
    assert_eq!(offset_of!(vfio_precopy_info, flags), 4);
    assert_eq!(offset_of!(vfio_precopy_info, initial_bytes), 8);
    assert_eq!(offset_of!(vfio_precopy_info, dirty_bytes), 16);
    // struct vfio_device_feature_dma_logging_control { aligned_u64 page_size; u32 num_ranges;
    // u32 __reserved; aligned_u64 ranges; }
    type Ctl = vfio_device_feature_dma_logging_control;
    assert_eq!(size_of::<Ctl>(), 24);
    assert_eq!(offset_of!(Ctl, page_size), 0);
    assert_eq!(offset_of!(Ctl, num_ranges), 8);
    assert_eq!(offset_of!(Ctl, __reserved), 12);
    assert_eq!(offset_of!(Ctl, ranges), 16);
    // struct vfio_device_feature_dma_logging_range { aligned_u64 iova, length; }
    type Range = vfio_device_feature_dma_logging_range;
    assert_eq!(size_of::<Range>(), 16);
    assert_eq!(offset_of!(Range, iova), 0);
    assert_eq!(offset_of!(Range, length), 8);
    assert_eq!(MAX_LOGGING_RANGES, 4096 / size_of::<Range>());
    // struct vfio_device_feature_dma_logging_report { aligned_u64 iova, length, page_size,
    // bitmap; }
    type Report = vfio_device_feature_dma_logging_report;
    assert_eq!(size_of::<Report>(), 32);
    assert_eq!(offset_of!(Report, iova), 0);
    assert_eq!(offset_of!(Report, length), 8);
    assert_eq!(offset_of!(Report, page_size), 16);
    assert_eq!(offset_of!(Report, bitmap), 24);
}

#[test]
fn feature_buffers_put_the_payload_at_data() {
    let f = Feature::new(
        VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        vfio_device_feature_mig_state {
            device_state: vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
            data_fd: -1,
        },
    );
    assert_eq!(size_of_val(&f), 16);
    assert_eq!(
        offset_of!(Feature<vfio_device_feature_mig_state>, payload),
        8
    );
    assert_eq!(f.hdr.argsz, 16);
    assert_eq!(f.hdr.flags, 0x2_0002);
    // The bytes the kernel sees.
    // SAFETY: `f` is a repr(C) struct of four u32 without padding; reading its 16 bytes is
    // reading initialised memory.
    let bytes: [u8; 16] = unsafe { std::mem::transmute_copy(&f) };
    let words: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(words, vec![16, 0x2_0002, 3, u32::MAX]);
    // A u64-aligned payload still starts at byte 8 (the header is 8 bytes).
    type Ctl = Feature<vfio_device_feature_dma_logging_control>;
    assert_eq!(offset_of!(Ctl, payload), 8);
    assert_eq!(size_of::<Ctl>(), 32);
}

#[test]
fn iommufd_argument_layouts_match_linux_iommufd_h() {
    // struct iommu_hwpt_alloc { u32 size, flags, dev_id, pt_id, out_hwpt_id, __reserved,
    // data_type, data_len; aligned_u64 data_uptr; u32 fault_id, __reserved2; }
    type A = iommu_hwpt_alloc;
    assert_eq!(size_of::<A>(), 48);
    let offs = [
        offset_of!(A, size),
        offset_of!(A, flags),
        offset_of!(A, dev_id),
        offset_of!(A, pt_id),
        offset_of!(A, out_hwpt_id),
        offset_of!(A, __reserved),
        offset_of!(A, data_type),
        offset_of!(A, data_len),
        offset_of!(A, data_uptr),
        offset_of!(A, fault_id),
        offset_of!(A, __reserved2),
    ];
    assert_eq!(offs, [0, 4, 8, 12, 16, 20, 24, 28, 32, 40, 44]);
    // struct iommu_hwpt_set_dirty_tracking { u32 size, flags, hwpt_id, __reserved; }
    type S = iommu_hwpt_set_dirty_tracking;
    assert_eq!(size_of::<S>(), 16);
    assert_eq!(
        [
            offset_of!(S, size),
            offset_of!(S, flags),
            offset_of!(S, hwpt_id),
            offset_of!(S, __reserved)
        ],
        [0, 4, 8, 12]
    );
    // struct iommu_hwpt_get_dirty_bitmap { u32 size, hwpt_id, flags, __reserved;
    // aligned_u64 iova, length, page_size, data; }
    type G = iommu_hwpt_get_dirty_bitmap;
    assert_eq!(size_of::<G>(), 48);
    assert_eq!(
        [
            offset_of!(G, size),
            offset_of!(G, hwpt_id),
            offset_of!(G, flags),
            offset_of!(G, __reserved),
            offset_of!(G, iova),
            offset_of!(G, length),
            offset_of!(G, page_size),
            offset_of!(G, data)
        ],
        [0, 4, 8, 12, 16, 24, 32, 40]
    );
    // Flags: IOMMU_HWPT_ALLOC_DIRTY_TRACKING 1 << 1, IOMMU_HWPT_DIRTY_TRACKING_ENABLE 1,
    // IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR 1, IOMMU_HW_CAP_DIRTY_TRACKING 1 << 0.
    assert_eq!(iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING, 2);
    assert_eq!(
        iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
        1
    );
    assert_eq!(
        iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
        1
    );
    assert_eq!(iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING, 1);
}

#[test]
fn iommufd_arguments_are_built_as_the_kernel_wants_them() {
    let a = dirty_hwpt_alloc(5, 9);
    assert_eq!(a.size, 48);
    assert_eq!(a.flags, 2, "DIRTY_TRACKING only");
    assert_eq!((a.dev_id, a.pt_id), (5, 9));
    assert_eq!((a.data_type, a.data_len, a.data_uptr), (0, 0, 0));
    assert_eq!((a.__reserved, a.fault_id, a.__reserved2), (0, 0, 0));

    let on = set_dirty_tracking_arg(11, true);
    assert_eq!(
        (on.size, on.flags, on.hwpt_id, on.__reserved),
        (16, 1, 11, 0)
    );
    let off = set_dirty_tracking_arg(11, false);
    assert_eq!(off.flags, 0);

    let mut bitmap = vec![0u64; 3];
    let g = get_dirty_bitmap_arg(11, 0x10_0000, 150 << 12, 4096, &mut bitmap);
    assert_eq!((g.size, g.hwpt_id, g.flags, g.__reserved), (48, 11, 0, 0));
    assert_eq!(
        (g.iova, g.length, g.page_size),
        (0x10_0000, 150 << 12, 4096)
    );
    assert_eq!(g.data, bitmap.as_ptr() as u64, "the bitmap's own address");
    assert_eq!(bitmap_words(g.length, g.page_size), 3);
}

/// A pair of connected sockets as files: the first stands in for the data fd.
fn fd_pair() -> (std::fs::File, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (std::fs::File::from(OwnedFd::from(a)), b)
}

/// Whether the peer of `s` is closed (a read sees the end of the stream).
fn peer_closed(s: &mut UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0))
}

#[test]
fn the_data_fd_lives_as_long_as_its_session() {
    let mut s = MigSession::default();
    let (fd, mut other) = fd_pair();
    let raw = fd.as_raw_fd();
    // RUNNING -> PRE_COPY: a new session, its fd kept.
    s.apply(vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY, Some(fd));
    assert_eq!(s.fd().unwrap().as_raw_fd(), raw);
    // PRE_COPY -> PRE_COPY_P2P -> STOP_COPY: the same session, no new fd.
    s.apply(vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P, None);
    s.apply(vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY, None);
    assert_eq!(s.fd().unwrap().as_raw_fd(), raw);
    assert!(!peer_closed(&mut other));
    // A reader still holding it keeps it open past the session's end.
    let reader = s.fd().unwrap();
    // STOP_COPY -> STOP: the session ends, the fd is closed (once the reader is done).
    s.apply(vfio_device_mig_state_VFIO_DEVICE_STATE_STOP, None);
    assert!(s.fd().is_none());
    assert!(!peer_closed(&mut other));
    drop(reader);
    assert!(peer_closed(&mut other), "the data fd was closed");

    // STOP -> RESUMING: a new fd; RESUMING -> STOP closes it.
    let (fd, mut other) = fd_pair();
    s.apply(vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING, Some(fd));
    assert!(s.fd().is_some());
    s.apply(vfio_device_mig_state_VFIO_DEVICE_STATE_STOP, None);
    assert!(peer_closed(&mut other));

    // An fd handed back for a state without a session is closed, not kept.
    let (fd, mut other) = fd_pair();
    s.apply(vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING, Some(fd));
    assert!(s.fd().is_none());
    assert!(peer_closed(&mut other));

    // A new session replaces the old fd (and closes it).
    let (a, mut a_other) = fd_pair();
    let (b, _b_other) = fd_pair();
    let b_raw = b.as_raw_fd();
    s.apply(vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY, Some(a));
    s.apply(vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY, Some(b));
    assert_eq!(s.fd().unwrap().as_raw_fd(), b_raw);
    assert!(peer_closed(&mut a_other));
}

#[test]
fn data_reads_loop_over_short_reads_up_to_max() {
    let (fd, mut w) = fd_pair();
    w.write_all(b"abcd").unwrap();
    w.write_all(b"efghij").unwrap();
    drop(w);
    // Asked for 3: exactly 3.
    assert_eq!(read_mig_data(&fd, 3).unwrap(), b"abc");
    // Asked for more than there is: the rest, then the end of the stream.
    assert_eq!(read_mig_data(&fd, 100).unwrap(), b"defghij");
    assert_eq!(read_mig_data(&fd, 100).unwrap(), b"");
    assert_eq!(read_mig_data(&fd, 0).unwrap(), b"");

    // Much more than one read returns, written in small pieces by another thread.
    let (fd, mut w) = fd_pair();
    let total = 300 << 10;
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        for c in data.chunks(7000) {
            w.write_all(c).unwrap();
        }
    });
    let got = read_mig_data(&fd, 200 << 10).unwrap();
    assert_eq!(got.len(), 200 << 10);
    assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    let rest = read_mig_data(&fd, 1 << 20).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len() + rest.len(), total);
}

#[test]
fn a_nonblocking_data_fd_with_nothing_ready_ends_the_read_for_now() {
    let (fd, mut w) = fd_pair();
    let r = UnixStream::from(OwnedFd::from(fd));
    r.set_nonblocking(true).unwrap();
    w.write_all(b"12345").unwrap();
    // The writer is still open: EAGAIN after 5 bytes means "no more for now".
    assert_eq!(read_mig_data(&r, 64).unwrap(), b"12345");
    assert_eq!(read_mig_data(&r, 64).unwrap(), b"");
}

/// A reader answering from a script, as the kernel's data fd can (ENOMSG, EINTR).
struct Script(VecDeque<io::Result<Vec<u8>>>);

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.pop_front() {
            None => Ok(0),
            Some(Err(e)) => Err(e),
            Some(Ok(d)) => {
                assert!(
                    d.len() <= buf.len(),
                    "the script gives what was asked at most"
                );
                buf[..d.len()].copy_from_slice(&d);
                Ok(d.len())
            }
        }
    }
}

fn errno(n: i32) -> io::Result<Vec<u8>> {
    Err(io::Error::from_raw_os_error(n))
}

#[test]
fn enomsg_is_the_end_for_now_and_eintr_is_retried() {
    // Pre-copy: data, EINTR, more data, then ENOMSG (the temporary end of the stream).
    let mut s = Script(VecDeque::from([
        Ok(b"abc".to_vec()),
        errno(libc::EINTR),
        Ok(b"de".to_vec()),
        errno(libc::ENOMSG),
        Ok(b"later".to_vec()),
    ]));
    assert_eq!(read_mig_data(&mut s, 100).unwrap(), b"abcde");
    // ENOMSG right away: zero bytes, not an error.
    let mut s = Script(VecDeque::from([errno(libc::ENOMSG)]));
    assert_eq!(read_mig_data(&mut s, 100).unwrap(), b"");
    // Any other error is one.
    let mut s = Script(VecDeque::from([Ok(b"x".to_vec()), errno(libc::EIO)]));
    let err = read_mig_data(&mut s, 100).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
}

/// A writer taking at most `step` bytes a call, failing once with EINTR.
struct SlowWriter {
    got: Vec<u8>,
    step: usize,
    interrupted: bool,
}

impl Write for SlowWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if !self.interrupted {
            self.interrupted = true;
            return Err(io::Error::from_raw_os_error(libc::EINTR));
        }
        let n = data.len().min(self.step);
        self.got.extend_from_slice(&data[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn data_writes_write_everything() {
    let mut w = SlowWriter {
        got: Vec::new(),
        step: 3,
        interrupted: false,
    };
    write_mig_data(&mut w, b"0123456789").unwrap();
    assert_eq!(w.got, b"0123456789");

    let (fd, mut r) = fd_pair();
    let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    let expect = data.clone();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        got
    });
    write_mig_data(&fd, &data).unwrap();
    drop(fd);
    assert_eq!(reader.join().unwrap(), expect);
}

#[test]
fn logging_ranges_are_merged_to_fit_the_kernels_cap() {
    // Overlapping and touching ranges join; empty ones go; order does not matter.
    let r = fit_logging_ranges(
        &[
            (0x3000, 0x1000),
            (0, 0x1000),
            (0x1000, 0x1000),
            (0x8000, 0),
            (0x2000, 0x1800),
        ],
        10,
    );
    assert_eq!(r, vec![(0, 0x4000)]);
    // Over the cap: the closest neighbours join first.
    let r = fit_logging_ranges(&[(0, 0x1000), (0x2000, 0x1000), (0x10_0000, 0x1000)], 2);
    assert_eq!(r, vec![(0, 0x3000), (0x10_0000, 0x1000)]);
    let r = fit_logging_ranges(&[(0, 0x1000), (0x2000, 0x1000), (0x10_0000, 0x1000)], 1);
    assert_eq!(r, vec![(0, 0x10_1000)]);
    // Many ranges: at most the cap, covering every one of them.
    let many: Vec<(u64, u64)> = (0..1000u64).map(|i| (i * 0x10_0000, 0x1000)).collect();
    let r = fit_logging_ranges(&many, MAX_LOGGING_RANGES);
    assert_eq!(r.len(), MAX_LOGGING_RANGES);
    for (iova, len) in &many {
        assert!(r.iter().any(|(i, l)| i <= iova && iova + len <= i + l));
    }
    // The top of the space does not wrap.
    let r = fit_logging_ranges(&[(u64::MAX - 0xfff, 0x2000)], 4);
    assert_eq!(r, vec![(u64::MAX - 0xfff, 0xfff)]);
    assert!(fit_logging_ranges(&[(0, 0)], 4).is_empty());
}

#[test]
fn long_reports_are_split_into_bounded_word_aligned_pieces() {
    // The default bound: 128 KiB of bitmap is 4 GiB of 4 KiB pages.
    let p = report_pieces(0, 10 << 30, 4096, MAX_REPORT_BITMAP_BYTES);
    assert_eq!(
        p,
        vec![(0, 4 << 30), (4 << 30, 4 << 30), (8 << 30, 2 << 30)]
    );
    // A short range: one piece.
    assert_eq!(
        report_pieces(0x1000, 0x5000, 4096, MAX_REPORT_BITMAP_BYTES),
        vec![(0x1000, 0x5000)]
    );
    // Tiny bound (one word = 64 pages a piece), odd lengths and page sizes.
    for page in [4096u64, 2 << 20] {
        for pages in [1u64, 63, 64, 65, 128, 129, 1000] {
            let len = pages * page;
            let pieces = report_pieces(0x4000_0000, len, page, 8);
            assert_eq!(pieces.iter().map(|p| p.1).sum::<u64>(), len);
            assert_eq!(pieces[0].0, 0x4000_0000);
            for w in pieces.windows(2) {
                assert_eq!(w[0].0 + w[0].1, w[1].0, "contiguous");
                assert_eq!(w[0].1, 64 * page, "whole words but the last");
            }
            assert!(pieces.iter().all(|p| bitmap_words(p.1, page) <= 1));
            let words: u64 = pieces.iter().map(|p| bitmap_words(p.1, page)).sum();
            assert_eq!(words, bitmap_words(len, page));
        }
    }
    assert!(report_pieces(0, 0, 4096, 8).is_empty());
}

#[test]
fn piecewise_bitmaps_concatenate_into_the_whole_ranges_bitmap() {
    let page = 4096;
    let (iova, len) = (0x10_0000u64, 300 * page);
    let dirty: Vec<u64> = vec![0, 1, 63, 64, 65, 127, 128, 200, 299];
    // What a kernel answers for one piece: bit n for page n of the piece.
    let report_piece = |at: u64, l: u64| {
        let mut bm = vec![0u64; bitmap_words(l, page) as usize];
        for d in &dirty {
            let a = iova + d * page;
            if a >= at && a < at + l {
                let n = (a - at) / page;
                bm[(n / 64) as usize] |= 1 << (n % 64);
            }
        }
        bm
    };
    let mut bitmap = Vec::new();
    for (at, l) in report_pieces(iova, len, page, 8) {
        bitmap.extend(report_piece(at, l));
    }
    let r = DmaDirtyReport {
        iova,
        length: len,
        page_size: page,
        bitmap,
    };
    let got: Vec<u64> = r.dirty_iovas().collect();
    let want: Vec<u64> = dirty.iter().map(|d| iova + d * page).collect();
    assert_eq!(got, want);
}

#[test]
fn reports_are_checked_before_the_kernel_sees_them() {
    let ok = check_report("r", 0x1000, 0x1000, 4096);
    assert!(ok.is_ok());
    for (iova, len, page) in [
        (0, 0x1000, 2048u64),
        (0, 0x1000, 4097),
        (0, 0x1000, 0),
        (0, 0, 4096),
        (u64::MAX - 0xfff, 0x2000, 4096),
    ] {
        let err = check_report("r", iova, len, page).unwrap_err();
        assert!(matches!(err, VfioError::Invalid { .. }), "{err:?}");
    }
}

#[test]
fn a_refused_dirty_tracking_page_table_is_explained() {
    let err = super::KernelVfioError::NoDirtyTracking {
        bdf: "0000:01:00.0".into(),
        reason: "IOMMU_GET_HW_INFO capabilities 0x0 lack IOMMU_HW_CAP_DIRTY_TRACKING".into(),
    };
    let msg = err.to_string();
    assert!(
        msg.starts_with("0000:01:00.0: the IOMMU cannot track"),
        "{msg}"
    );
    assert!(msg.contains("IOMMU_HW_CAP_DIRTY_TRACKING"), "{msg}");
    assert!(msg.contains("DMA logging"), "{msg}");
}

const SKIP: &str = "SKIPPED kernel VFIO migration test";

#[test]
fn kernel_vfio_migration_on_a_real_device() {
    if !Path::new("/dev/vfio/vfio").exists() {
        let _ = writeln!(
            io::stderr(),
            "{SKIP}: /dev/vfio/vfio does not exist (no VFIO on this host); the ioctls against a \
             device, the data fd from the kernel and DMA logging were NOT exercised"
        );
        return;
    }
    let Ok(spec) = std::env::var("SKIFF_TEST_VFIO_DEVICE") else {
        let _ = writeln!(
            io::stderr(),
            "{SKIP}: /dev/vfio/vfio exists but SKIFF_TEST_VFIO_DEVICE is not set (name a \
             device bound to vfio-pci, e.g. /sys/bus/pci/devices/0000:01:00.0)"
        );
        return;
    };
    let sysfs = SysfsRoot::new("/sys");
    let prepared = sysfs
        .prepare(&spec, BindOptions::default())
        .unwrap_or_else(|e| panic!("SKIFF_TEST_VFIO_DEVICE={spec}: {e}"));
    let dev = super::VfioGroupSet::new(None)
        .open(prepared)
        .unwrap_or_else(|e| panic!("SKIFF_TEST_VFIO_DEVICE={spec}: {e}"));
    let mig = dev
        .migration()
        .expect("kernel devices carry the migration uAPI");
    // Safe on any device: queries only, and DMA logging over one page.
    let flags = mig.migration_flags().unwrap();
    let _ = writeln!(io::stderr(), "{spec}: migration flags {flags:?}");
    if flags.is_some() {
        assert_eq!(
            mig.mig_state().unwrap(),
            vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING
        );
        let _ = mig.mig_data_size().unwrap();
    }
    assert_eq!(dev.precopy_info().unwrap(), None, "not in pre-copy");
    assert!(matches!(
        mig.mig_data_read(16),
        Err(VfioError::Invalid { .. })
    ));
    if let Some(page) = mig
        .dma_logging_start(4096, &[(0x1000_0000, 0x20_0000)])
        .unwrap()
    {
        let r = mig
            .dma_logging_report(0x1000_0000, 0x20_0000, page)
            .unwrap();
        assert_eq!(r.bitmap.len() as u64, bitmap_words(0x20_0000, page));
        mig.dma_logging_stop().unwrap();
    }
    super::KernelVfioDevice::close(dev).unwrap();
}
