//! The vfio-user test device's request parser: a whole session served from the bytes a client
//! sends.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use testdev::server::{serve, Options};

/// Bytes of the input sent as the client's messages at most; keeps the write into the socket
/// below its buffer size.
pub const MAX_INPUT: usize = 64 << 10;

/// The client's messages (VERSION first, then any command), served by the test device's session
/// loop until the input ends; its replies and DMA requests are read and dropped. The device
/// waits 10 ms for the answer to a DMA request it makes.
pub fn request(data: &[u8]) {
    let data = &data[..data.len().min(MAX_INPUT)];
    let (mut client, server) = UnixStream::pair().expect("a socket pair");
    let mut reader = client.try_clone().expect("a socket");
    let _ = client.write_all(data);
    let _ = client.shutdown(std::net::Shutdown::Write);
    let drain = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    let opts = Options {
        id: "fuzz".into(),
        dma_timeout: Duration::from_millis(10),
        ..Options::default()
    };
    let _ = serve(server, &opts);
    drop(client);
    let _ = drain.join();
}
