//! Every message round-trips through its encoding and through a stream in a `Vec`.

use super::*;

fn ram_frame() -> RamFrame {
    // Bare records as RamWriter::bare writes them: one DATA page, one ZERO page.
    let source = small_source();
    let mut tx = MigrationSender::new(Vec::new()).unwrap();
    tx.send(&hello(0, 1)).unwrap();
    tx.send_ram(&source, [(0x1000, 2 * PAGE_SIZE)], ZeroPages::Send)
        .unwrap();
    let bytes = tx.get_mut().clone();
    let frames = split_frames(&bytes);
    let (kind, payload) = &frames[1];
    assert_eq!(*kind, FrameKind::Ram as u8);
    match Message::decode(FrameKind::Ram, payload.clone(), 0).unwrap() {
        Message::Ram(f) => f,
        other => panic!("{other:?}"),
    }
}

fn migration_messages() -> Vec<Message> {
    vec![
        hello(0, 1),
        Message::Config(config()),
        Message::Ram(ram_frame()),
        Message::DevicePrecopy {
            id: "vfio0".into(),
            data: vec![0, 1, 2, 255],
        },
        Message::DevicePrecopy {
            id: "vfio1".into(),
            data: Vec::new(),
        },
        Message::State(sections()),
        Message::IterationEnd(IterationEnd {
            iteration: 7,
            pages: 1 << 40,
        }),
        Message::Complete(Complete {
            frames: 3,
            bytes: 1 << 33,
            ram_pages: 99,
            iterations: 4,
            chain: 0xdead_beef,
        }),
        Message::Abort("the operator cancelled".into()),
    ]
}

fn reply_messages() -> Vec<Message> {
    vec![
        Message::Accept,
        Message::Refuse("device disk0: missing on the target".into()),
        Message::Ready,
        Message::Resumed,
        Message::Failed("cannot restore cpu0: bad MSRs".into()),
    ]
}

#[test]
fn every_message_round_trips_through_its_encoding() {
    for msg in migration_messages().into_iter().chain(reply_messages()) {
        let payload = msg.encode().unwrap();
        let back = Message::decode(msg.kind(), payload, 0).unwrap();
        assert_eq!(back, msg);
    }
    let f = ram_frame();
    assert_eq!(f.iteration, 0);
    assert_eq!(f.pages, 2);
    assert_eq!(RamFrame::new(f.iteration, f.pages, f.records()), f);
}

#[test]
fn every_message_round_trips_through_a_stream() {
    let sent = migration_messages();
    let mut tx = MigrationSender::new(Vec::new()).unwrap();
    for msg in &sent {
        match msg {
            Message::IterationEnd(_) => {
                let end = tx.end_iteration().unwrap();
                assert_eq!(
                    end,
                    IterationEnd {
                        iteration: 0,
                        pages: 2
                    }
                );
            }
            Message::Complete(_) | Message::Abort(_) => {}
            m => tx.send(m).unwrap(),
        }
    }
    let (bytes, complete) = tx.complete().unwrap();
    assert_eq!(complete.frames, 7);
    assert_eq!(complete.ram_pages, 2);
    assert_eq!(complete.iterations, 1);
    assert_eq!(complete.bytes + 9 + 32, bytes.len() as u64);

    let mut rx = MigrationReceiver::new(&bytes[..]).unwrap();
    for msg in &sent {
        match msg {
            Message::IterationEnd(_) => {
                let got = rx.recv().unwrap();
                assert_eq!(
                    got,
                    Message::IterationEnd(IterationEnd {
                        iteration: 0,
                        pages: 2
                    })
                );
            }
            Message::Complete(_) | Message::Abort(_) => {}
            m => assert_eq!(&rx.recv().unwrap(), m),
        }
    }
    assert_eq!(rx.recv().unwrap(), Message::Complete(complete));
    assert!(rx.is_complete());
    assert_eq!(
        rx.hello(),
        match &sent[0] {
            Message::Hello(h) => Some(h),
            _ => None,
        }
    );
    assert_eq!(rx.iteration(), 1);
    assert_eq!(rx.bytes_received(), bytes.len() as u64);
    assert!(matches!(rx.recv(), Err(StreamError::Ended)));

    // ABORT ends a stream too.
    let mut tx = MigrationSender::new(Vec::new()).unwrap();
    tx.send(&hello(0, 1)).unwrap();
    tx.send(&Message::Abort("cancelled".into())).unwrap();
    let err = tx.send(&Message::Config(config())).unwrap_err();
    assert!(err.to_string().contains("the stream has ended"), "{err}");
    let bytes = tx.get_mut().clone();
    let mut rx = MigrationReceiver::new(&bytes[..]).unwrap();
    rx.recv().unwrap();
    assert_eq!(rx.recv().unwrap(), Message::Abort("cancelled".into()));
    assert!(!rx.is_complete());
}

#[test]
fn replies_round_trip_and_keep_to_their_direction() {
    let mut tx = MigrationSender::replies(Vec::new()).unwrap();
    for msg in reply_messages() {
        tx.send(&msg).unwrap();
    }
    assert!(matches!(
        tx.send(&hello(0, 1)),
        Err(StreamError::Invalid {
            kind: FrameKind::Hello,
            ..
        })
    ));
    let bytes = tx.get_mut().clone();
    assert_eq!(bytes[..8], REPLY_MAGIC);
    let mut rx = MigrationReceiver::replies(&bytes[..]).unwrap();
    for msg in reply_messages() {
        assert_eq!(rx.recv().unwrap(), msg);
    }
    assert!(matches!(rx.recv(), Err(StreamError::Truncated { .. })));

    // A reply stream is not a migration stream, and a reply frame has no place in one.
    let err = MigrationReceiver::new(&bytes[..]).unwrap_err();
    assert!(matches!(
        err,
        StreamError::BadMagic {
            expected: "migration stream",
            ..
        }
    ));
    assert!(
        err.to_string().starts_with("not a skiff migration stream"),
        "{err}"
    );
    let mut tx = MigrationSender::new(Vec::new()).unwrap();
    assert!(tx.send(&Message::Accept).is_err());
    let mut frames = split_frames(&small_stream(&small_source(), 1 << 20));
    frames.insert(1, (FrameKind::Accept as u8, Vec::new()));
    let err = receive(&[join_frames(&frames)], &mem(&layout()), &mut Rng::new(1)).unwrap_err();
    assert!(
        matches!(err, StreamError::Sequence { kind: FrameKind::Accept, ref reason, .. } if reason.contains("not a frame of a migration stream")),
        "{err}"
    );
}

#[test]
fn sender_refuses_what_the_protocol_cannot_carry() {
    let mut tx = MigrationSender::new(Vec::new()).unwrap();
    let err = tx.send(&Message::Config(config())).unwrap_err();
    assert!(
        err.to_string().contains("the first frame must be HELLO"),
        "{err}"
    );
    let bad_hello = Message::Hello(Hello {
        software: "x".repeat(5000),
        ..match hello(0, 1) {
            Message::Hello(h) => h,
            _ => unreachable!(),
        }
    });
    assert!(matches!(
        tx.send(&bad_hello),
        Err(StreamError::Invalid { .. })
    ));
    tx.send(&hello(0, 1)).unwrap();
    let start = tx.bytes_sent();
    assert!(tx.send(&hello(0, 1)).is_err(), "a second HELLO");
    let mut c = config();
    c.ram = vec![(0, 100)];
    assert!(matches!(
        tx.send(&Message::Config(c)),
        Err(StreamError::Invalid {
            kind: FrameKind::Config,
            ..
        })
    ));
    let big = Message::DevicePrecopy {
        id: "vfio0".into(),
        data: vec![0; MAX_FRAME_LEN as usize],
    };
    let err = tx.send(&big).unwrap_err();
    assert!(err.to_string().contains("a frame holds at most"), "{err}");
    assert!(matches!(
        tx.send(&Message::IterationEnd(IterationEnd {
            iteration: 0,
            pages: 0
        })),
        Err(StreamError::Invalid { .. })
    ));
    let err = tx
        .send(&Message::Ram(RamFrame::new(3, 0, &[])))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("iteration 3 while iteration 0 is open"),
        "{err}"
    );
    let err = tx
        .send_ram(&mem(&layout()), [(3 * MIB, PAGE_SIZE)], ZeroPages::Send)
        .unwrap_err();
    assert!(
        matches!(err, StreamError::Ram { iteration: 0, .. }),
        "{err}"
    );
    // Nothing of the refused messages was written.
    assert_eq!(tx.bytes_sent(), start);

    // A second connection carries only RAM.
    let mut tx = MigrationSender::new(Vec::new()).unwrap();
    tx.send(&hello(1, 2)).unwrap();
    let err = tx.send(&Message::State(sections())).unwrap_err();
    assert!(
        err.to_string().contains("connection 1 carries only RAM"),
        "{err}"
    );
}

#[test]
fn config_differences_name_what_differs() {
    let source = config();
    assert!(source.differences(&source).is_empty());
    let mut target = config();
    target.host[0].1 = "AuthenticAMD".into();
    target.host.remove(2);
    target.ram[1].1 += PAGE_SIZE;
    target.devices[1].pci_address = Some("0000:00:04.0".into());
    target.devices.push(DeviceEntry {
        id: "net0".into(),
        kind: "virtio-net".into(),
        pci_address: None,
    });
    let diff = source.differences(&target);
    assert_eq!(diff.len(), 5, "{diff:#?}");
    assert!(diff[0].contains("cpu.vendor is AuthenticAMD here, GenuineIntel on the source"));
    assert!(diff[1].contains("the target has no cpuid.7.0.ebx"));
    assert!(diff[2].starts_with("RAM: "));
    assert!(diff[3].contains("disk0") && diff[3].contains("0000:00:04.0"));
    assert!(diff[4].contains("net0: only on the target"));
}
