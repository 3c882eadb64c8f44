//! `serial-stream`: write numbered, checksummed lines to COM1 as fast as the UART takes them,
//! forever, so a test can prove that pause silences the serial port and that a snapshot/restore
//! loses, duplicates or tears no byte of it.
//!
//! Line `n` (from 0): `ss NNNNNNNN PAYLOAD CCCCCCCC\n`, where `NNNNNNNN` is `n` in decimal with at
//! least 8 digits, `PAYLOAD` is [`PAYLOAD_LEN`] characters of [`ALPHABET`] derived from `n`
//! ([`payload_char`]) and `CCCCCCCC` is the FNV-1a 32-bit hash of everything before the space
//! that precedes it (`ss NNNNNNNN PAYLOAD`), in lowercase hex. The host side
//! (`tests/integration/tests/serial.rs`) recomputes both.

use crate::bootinfo::BootInfo;
use crate::serial::{Uart, COM1};

/// Payload length of every line.
pub const PAYLOAD_LEN: usize = 60;

/// Characters of the payload.
pub const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Character `i` of line `n`'s payload.
pub fn payload_char(n: u64, i: usize) -> u8 {
    let x = n
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add((i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    ALPHABET[((x >> 29) % 62) as usize]
}

fn fnv1a(h: u32, bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

const FNV_OFFSET: u32 = 0x811c_9dc5;

/// Format line `n` (including the newline) into `buf`; returns its length.
fn format_line(n: u64, buf: &mut [u8; 128]) -> usize {
    let mut len = 0;
    let mut push = |b: u8, len: &mut usize| {
        buf[*len] = b;
        *len += 1;
    };
    push(b's', &mut len);
    push(b's', &mut len);
    push(b' ', &mut len);
    // Decimal, at least 8 digits.
    let mut digits = [0u8; 20];
    let mut k = 0;
    let mut v = n;
    loop {
        digits[k] = b'0' + (v % 10) as u8;
        k += 1;
        v /= 10;
        if v == 0 && k >= 8 {
            break;
        }
    }
    for d in digits[..k].iter().rev() {
        push(*d, &mut len);
    }
    push(b' ', &mut len);
    for i in 0..PAYLOAD_LEN {
        push(payload_char(n, i), &mut len);
    }
    let crc = fnv1a(FNV_OFFSET, &buf[..len]);
    buf[len] = b' ';
    len += 1;
    for s in (0..8).rev() {
        buf[len] = b"0123456789abcdef"[((crc >> (4 * s)) & 0xf) as usize];
        len += 1;
    }
    buf[len] = b'\n';
    len + 1
}

/// Stream lines forever.
pub fn run(_boot: &BootInfo) {
    crate::println!("serial-stream: start");
    // The console lock is not needed: only the BSP runs, and nothing else prints from here on.
    let uart = Uart::new(COM1);
    let mut buf = [0u8; 128];
    let mut n: u64 = 0;
    loop {
        let len = format_line(n, &mut buf);
        for &b in &buf[..len] {
            uart.write_byte(b);
        }
        n += 1;
    }
}
