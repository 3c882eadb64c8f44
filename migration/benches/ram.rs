//! RAM stream throughput: write and read 256 MiB of guest RAM (half of it zero pages) through a
//! `Vec<u8>`, and write it to `io::sink`. `SKIFF_BENCH_RAM_MIB` changes the size.
//!
//! Run with `cargo bench -p migration --bench ram`.

use std::io::Cursor;
use std::time::Instant;

use migration::ram::{restore_memory_image, write_all_ram, write_memory_image};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGE: usize = 4096;

fn main() {
    let mib: usize = std::env::var("SKIFF_BENCH_RAM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let size = mib << 20;
    let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).expect("guest RAM");
    // Every other page holds data; the others stay zero.
    let page: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8 + 1).collect();
    for p in (0..size / PAGE).step_by(2) {
        src.write_slice(&page, GuestAddress((p * PAGE) as u64))
            .expect("fill");
    }
    let mb = mib as f64 * 1.048_576;

    let t = Instant::now();
    let (_, stats) = write_all_ram(&src, std::io::sink()).expect("write to sink");
    let sink_s = t.elapsed().as_secs_f64();

    let mut out = Vec::with_capacity(size / 2 + (1 << 20));
    let t = Instant::now();
    write_memory_image(&src, &mut out).expect("write to Vec");
    let write_s = t.elapsed().as_secs_f64();

    let dst = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).expect("guest RAM");
    let t = Instant::now();
    restore_memory_image(&dst, &mut Cursor::new(&out), true).expect("read");
    let read_s = t.elapsed().as_secs_f64();

    println!(
        "RAM stream, {mib} MiB guest RAM ({} data pages, {} zero pages skipped, {} stream bytes)",
        stats.data_pages, stats.skipped_zero_pages, stats.stream_bytes
    );
    println!("  write to io::sink: {:8.0} MB/s of guest RAM", mb / sink_s);
    println!(
        "  write to Vec<u8>:  {:8.0} MB/s of guest RAM",
        mb / write_s
    );
    println!("  read from Vec<u8>: {:8.0} MB/s of guest RAM", mb / read_s);
}
