//! The migration messages (DEVICE_FEATURE for MIGRATION, MIG_DEVICE_STATE, MIG_DATA_SIZE and DMA
//! logging; MIG_DATA_READ/WRITE) against the fake server, bytes laid out from the specification.

use super::*;
use crate::vfio::mig_backend::MigrationBackend;

const DEVICE_FEATURE: u16 = 16;
const MIG_DATA_READ: u16 = 17;
const MIG_DATA_WRITE: u16 = 18;
const GET: u32 = 1 << 16;
const SET: u32 = 1 << 17;

/// A DEVICE_FEATURE request: (argsz, flags, data).
fn feature(m: &Msg) -> (u32, u32, Vec<u8>) {
    assert_eq!(m.cmd, DEVICE_FEATURE);
    (
        u32le(&m.payload, 0),
        u32le(&m.payload, 4),
        m.payload[8..].to_vec(),
    )
}

/// A DEVICE_FEATURE reply carrying `data` (argsz = 8 + data).
fn feature_reply(f: &Fake, m: &Msg, flags: u32, data: &[u8]) {
    let mut p = bytes!((8 + data.len()) as u32, flags);
    p.extend_from_slice(data);
    f.reply(m, &p);
}

#[test]
fn migration_flags_state_arcs_and_data_size() {
    let (b, h) = start(|f| {
        f.handshake_default();
        // MIGRATION GET: flags u64 = STOP_COPY | P2P | PRE_COPY.
        let m = f.expect(DEVICE_FEATURE);
        let (argsz, flags, data) = feature(&m);
        assert_eq!(flags, 1 | GET);
        assert!(argsz >= 16, "room for the u64 flags");
        assert!(data.is_empty());
        feature_reply(&f, &m, flags, &bytes!(7u64));
        // MIG_DEVICE_STATE SET RUNNING_P2P (5), data_fd -1.
        let m = f.expect(DEVICE_FEATURE);
        let (_, flags, data) = feature(&m);
        assert_eq!(flags, 2 | SET);
        assert_eq!(data, bytes!(5u32, -1i32));
        feature_reply(&f, &m, flags, &data);
        // MIG_DEVICE_STATE GET -> 5.
        let m = f.expect(DEVICE_FEATURE);
        let (_, flags, _) = feature(&m);
        assert_eq!(flags, 2 | GET);
        feature_reply(&f, &m, flags, &bytes!(5u32, -1i32));
        // A refused arc: EINVAL.
        let m = f.expect(DEVICE_FEATURE);
        f.reply_err(&m, libc::EINVAL as u32);
        // MIG_DATA_SIZE (9) GET -> 123456.
        let m = f.expect(DEVICE_FEATURE);
        let (_, flags, _) = feature(&m);
        assert_eq!(flags, 9 | GET);
        feature_reply(&f, &m, flags, &bytes!(123_456u64));
        // MIG_DATA_SIZE refused: the device does not say.
        let m = f.expect(DEVICE_FEATURE);
        f.reply_err(&m, libc::ENOTSUP as u32);
        f.drain();
    });
    assert_eq!(b.migration_flags().unwrap(), Some(7));
    b.set_mig_state(5).unwrap();
    assert_eq!(b.mig_state().unwrap(), 5);
    let r = b.set_mig_state(3);
    assert!(
        matches!(&r, Err(VfioError::Refused { source, .. }) if source.raw_os_error() == Some(libc::EINVAL)),
        "{r:?}"
    );
    assert_eq!(b.mig_data_size().unwrap(), Some(123_456));
    assert_eq!(b.mig_data_size().unwrap(), None);
    finish(b, h);
}

#[test]
fn no_migration_feature_and_hostile_feature_replies() {
    let (b, h) = start(|f| {
        f.handshake_default();
        let m = f.expect(DEVICE_FEATURE);
        f.reply_err(&m, libc::ENOTSUP as u32);
        // Flags too short: 4 bytes instead of 8.
        let m = f.expect(DEVICE_FEATURE);
        feature_reply(&f, &m, 1 | GET, &bytes!(7u32));
        // More data than asked for.
        let m = f.expect(DEVICE_FEATURE);
        feature_reply(&f, &m, 2 | GET, &[0u8; 64]);
        f.drain();
    });
    assert_eq!(b.migration_flags().unwrap(), None);
    assert!(is_protocol(&b.migration_flags(), "4 bytes"));
    assert!(matches!(b.mig_state(), Err(VfioError::Protocol { .. })));
    finish(b, h);
}

#[test]
fn mig_data_read_short_means_done_and_write_splits() {
    let (b, h) = start(|f| {
        f.handshake(r#"{"capabilities":{"max_msg_fds":4,"max_data_xfer_size":16}}"#);
        // Read 100 asked, clamped to 16: answer 16 bytes.
        let m = f.expect(MIG_DATA_READ);
        assert_eq!(
            u32le(&m.payload, 4),
            16,
            "size clamped to max_data_xfer_size"
        );
        assert_eq!(u32le(&m.payload, 0), 8 + 16, "argsz: the largest reply");
        let mut p = bytes!(8u32 + 16, 16u32);
        p.extend_from_slice(&[0xab; 16]);
        f.reply(&m, &p);
        // Then a short (3-byte) read.
        let m = f.expect(MIG_DATA_READ);
        let mut p = bytes!(8u32 + 3, 3u32);
        p.extend_from_slice(&[1, 2, 3]);
        f.reply(&m, &p);
        // Then zero bytes.
        let m = f.expect(MIG_DATA_READ);
        f.reply(&m, &bytes!(8u32, 0u32));
        // A hostile reply: more bytes than asked.
        let m = f.expect(MIG_DATA_READ);
        let mut p = bytes!(8u32 + 20, 20u32);
        p.extend_from_slice(&[0; 20]);
        f.reply(&m, &p);
        // Writes of 40 bytes arrive as 16 + 16 + 8.
        let mut got = Vec::new();
        for want in [16usize, 16, 8] {
            let m = f.expect(MIG_DATA_WRITE);
            assert_eq!(u32le(&m.payload, 4) as usize, want);
            assert_eq!(m.payload.len(), 8 + want);
            got.extend_from_slice(&m.payload[8..]);
            f.reply(&m, &[]);
        }
        assert_eq!(got, (0..40u8).collect::<Vec<_>>());
        f.drain();
    });
    let m: &dyn MigrationBackend = &b;
    assert_eq!(m.mig_data_read(100).unwrap(), vec![0xab; 16]);
    assert_eq!(m.mig_data_read(16).unwrap(), vec![1, 2, 3]);
    assert!(m.mig_data_read(16).unwrap().is_empty());
    assert!(matches!(
        m.mig_data_read(16),
        Err(VfioError::Protocol { .. })
    ));
    m.mig_data_write(&(0..40u8).collect::<Vec<_>>()).unwrap();
    finish(b, h);
}

#[test]
fn dma_logging_start_report_stop() {
    let (b, h) = start(|f| {
        f.handshake_default();
        // START: page_size, num_ranges, reserved, ranges (iova, length).
        let m = f.expect(DEVICE_FEATURE);
        let (_, flags, data) = feature(&m);
        assert_eq!(flags, 6 | SET);
        assert_eq!(
            data,
            bytes!(
                4096u64,
                2u32,
                0u32,
                0u64,
                0x10_0000u64,
                0x4000_0000u64,
                0x8000u64
            )
        );
        // The device picks 8 KiB pages.
        let mut r = data.clone();
        r[..8].copy_from_slice(&8192u64.to_le_bytes());
        feature_reply(&f, &m, flags, &r);
        // REPORT of 130 pages at 0x1000: iova, length, page_size, then 3 u64 words.
        let m = f.expect(DEVICE_FEATURE);
        let (argsz, flags, data) = feature(&m);
        assert_eq!(flags, 8 | GET);
        assert_eq!(data, bytes!(0x1000u64, 130u64 * 4096, 4096u64));
        assert!(argsz as usize >= 8 + 24 + 24, "room for the bitmap");
        let mut r = data.clone();
        // Pages 0, 65, 129 (the last) and stray bits past the range (130, 131), dropped.
        r.extend_from_slice(&bytes!(1u64, 2u64, (1u64 << 1) | (1 << 2) | (1 << 3)));
        feature_reply(&f, &m, flags, &r);
        // A report for another range than asked: refused.
        let m = f.expect(DEVICE_FEATURE);
        let (_, flags, _) = feature(&m);
        let mut r = bytes!(0x2000u64, 4096u64, 4096u64);
        r.extend_from_slice(&bytes!(1u64));
        feature_reply(&f, &m, flags, &r);
        // STOP.
        let m = f.expect(DEVICE_FEATURE);
        let (_, flags, data) = feature(&m);
        assert_eq!(flags, 7 | SET);
        assert!(data.is_empty());
        feature_reply(&f, &m, flags, &[]);
        // A device without logging.
        let m = f.expect(DEVICE_FEATURE);
        f.reply_err(&m, libc::ENOTSUP as u32);
        f.drain();
    });
    let m: &dyn MigrationBackend = &b;
    let ranges = [(0, 0x10_0000), (0x4000_0000, 0x8000)];
    assert_eq!(m.dma_logging_start(4096, &ranges).unwrap(), Some(8192));
    let rep = m.dma_logging_report(0x1000, 130 * 4096, 4096).unwrap();
    assert_eq!(
        rep.dirty_iovas().collect::<Vec<_>>(),
        vec![0x1000, 0x1000 + 65 * 4096, 0x1000 + 129 * 4096]
    );
    assert!(is_protocol(
        &m.dma_logging_report(0x1000, 4096, 4096),
        "another range"
    ));
    m.dma_logging_stop().unwrap();
    assert_eq!(m.dma_logging_start(4096, &ranges).unwrap(), None);
    finish(b, h);
}

/// A handler that takes its time and records when a write finished.
struct SlowWrites(Mutex<Vec<Instant>>);

impl DmaHandler for SlowWrites {
    fn dma_read(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
        Err(io::ErrorKind::InvalidInput.into())
    }
    fn dma_write(&self, _: u64, _: &[u8]) -> io::Result<()> {
        std::thread::sleep(Duration::from_millis(200));
        self.0.lock().unwrap().push(Instant::now());
        Ok(())
    }
}

/// A device that sends a DMA_WRITE (a P2P write, say) just before answering an arc: the arc
/// completes only after that write was served, though the reply arrived long before.
#[test]
fn an_arc_completes_only_after_the_dma_the_device_sent_before_it() {
    let (b, h) = start(|f| {
        f.handshake_default();
        let m = f.expect(DEVICE_FEATURE);
        // The DMA_WRITE first, then at once the reply to the arc.
        let mut w = hdr(200, 12, 17, 0, 0);
        w.extend_from_slice(&bytes!(0x1000u64, 1u64));
        w.push(9);
        f.send(&w, &[]);
        let (_, flags, data) = feature(&m);
        feature_reply(&f, &m, flags, &data);
        let r = f.recv().expect("the DMA_WRITE reply");
        assert_eq!((r.id, r.cmd), (200, 12));
        f.drain();
    });
    let writes = Arc::new(SlowWrites(Mutex::new(Vec::new())));
    b.set_dma_handler(writes.clone());
    b.set_mig_state(5).unwrap();
    let returned = Instant::now();
    let done = writes.0.lock().unwrap().clone();
    assert_eq!(
        done.len(),
        1,
        "the arc returned before the device's DMA was served"
    );
    assert!(done[0] <= returned);
    finish(b, h);
}
