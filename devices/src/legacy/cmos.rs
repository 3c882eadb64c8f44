//! An MC146818 RTC / CMOS memory.
//!
//! The VMM registers it at I/O port 0x70 with length 2: offset 0 (0x70) is the write-only index
//! register (bit 7, the NMI mask, is ignored), offset 1 (0x71) the data register. Only one-byte
//! accesses are handled.
//!
//! The clock follows the host's wall clock (UTC) plus an offset the guest sets by writing the time
//! registers. Registers read by default in BCD and 24-hour mode (register B = 0x02); the guest may
//! switch to binary or 12-hour mode through register B. The update-in-progress bit is never set,
//! the clock is never reported as stopped, and no RTC interrupt is generated (register C reads 0).
//! While the guest holds register B's SET bit, time writes go to a latched copy that becomes the
//! clock when SET is cleared.
//!
//! Memory-size bytes for firmware-style probes: 0x15/0x16 base memory (640 KiB), 0x17/0x18 and
//! 0x30/0x31 extended memory above 1 MiB in KiB (capped at 0xFFFF), 0x34/0x35 RAM between 16 MiB
//! and the top of low RAM in 64 KiB units, 0x5B..=0x5D RAM above 4 GiB in 64 KiB units.

use std::time::{SystemTime, UNIX_EPOCH};

use migration::{Pausable, Snapshottable, StateError, StateSection};

use super::log_limit::LogLimiter;
use super::state::{StateReader, StateWriter};
use crate::bus::BusDevice;

/// Number of I/O ports the VMM registers (0x70, 0x71).
pub const CMOS_PORT_COUNT: u64 = 2;
/// Bytes of CMOS memory (including the clock registers).
pub const CMOS_SIZE: usize = 128;
/// Version of the CMOS state section.
pub const CMOS_STATE_VERSION: u16 = 1;

const INDEX_OFFSET: u64 = 0;
const DATA_OFFSET: u64 = 1;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0A;
const REG_B: u8 = 0x0B;
const REG_C: u8 = 0x0C;
const REG_D: u8 = 0x0D;
const REG_CENTURY: u8 = 0x32;

/// Register A: 32.768 kHz time base, 1024 Hz periodic rate; bit 7 (UIP) always reads 0.
const REG_A_DEFAULT: u8 = 0x26;
const REG_A_UIP: u8 = 0x80;
/// Register B: 24-hour mode (bit 1), BCD (bit 2 clear).
const REG_B_DEFAULT: u8 = 0x02;
const REG_B_SET: u8 = 0x80;
const REG_B_BINARY: u8 = 0x04;
const REG_B_24H: u8 = 0x02;
/// Register D: valid RAM and time.
const REG_D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const UNIT_64K: u64 = 64 * KIB;

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let (m, d) = (i64::from(m), i64::from(d));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }

    /// Seconds since the epoch; out-of-range fields (a guest can write anything) are clamped.
    fn to_unix(self) -> i64 {
        let days = days_from_civil(self.year, self.month.clamp(1, 12), self.day.clamp(1, 31));
        days * 86_400
            + i64::from(self.hour.min(23)) * 3600
            + i64::from(self.minute.min(59)) * 60
            + i64::from(self.second.min(59))
    }

    /// Day of the week, 1 = Sunday (1970-01-01 was a Thursday).
    fn weekday(self) -> u8 {
        (days_from_civil(self.year, self.month.clamp(1, 12), self.day.clamp(1, 31)) + 4)
            .rem_euclid(7) as u8
            + 1
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0xf)
}

fn host_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2),
        Err(_) => 0,
    }
}

/// The RTC / CMOS device; see the module documentation.
pub struct Cmos {
    id: String,
    index: u8,
    data: [u8; CMOS_SIZE],
    /// Guest time minus host time, in seconds.
    offset_secs: i64,
    /// The time being written while register B's SET bit is held.
    latched: Option<DateTime>,
    clock: fn() -> i64,
    ignored: LogLimiter,
}

impl Cmos {
    /// A CMOS whose memory-size bytes describe `mem_below_4g` bytes of RAM starting at address 0
    /// (the end of low RAM) and `mem_above_4g` bytes starting at 4 GiB; id `cmos`.
    pub fn new(mem_below_4g: u64, mem_above_4g: u64) -> Self {
        let mut data = [0u8; CMOS_SIZE];
        data[REG_A as usize] = REG_A_DEFAULT;
        data[REG_B as usize] = REG_B_DEFAULT;
        data[REG_D as usize] = REG_D_VRT;

        let base_kib: u16 = 640;
        data[0x15..=0x16].copy_from_slice(&base_kib.to_le_bytes());
        let ext_kib = (mem_below_4g.saturating_sub(MIB) / KIB).min(0xFFFF) as u16;
        data[0x17..=0x18].copy_from_slice(&ext_kib.to_le_bytes());
        data[0x30..=0x31].copy_from_slice(&ext_kib.to_le_bytes());
        let above_16m = (mem_below_4g.saturating_sub(16 * MIB) / UNIT_64K).min(0xFFFF) as u16;
        data[0x34..=0x35].copy_from_slice(&above_16m.to_le_bytes());
        let above_4g = (mem_above_4g / UNIT_64K).min(0xFF_FFFF) as u32;
        data[0x5B..=0x5D].copy_from_slice(&above_4g.to_le_bytes()[..3]);

        Self {
            id: "cmos".to_string(),
            index: 0,
            data,
            offset_secs: 0,
            latched: None,
            clock: host_now,
            ignored: LogLimiter::new(),
        }
    }

    /// Use `id` as the state-section id instead of `cmos`.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    fn now(&self) -> DateTime {
        self.latched
            .unwrap_or_else(|| DateTime::from_unix((self.clock)().saturating_add(self.offset_secs)))
    }

    fn reg_b(&self) -> u8 {
        self.data[REG_B as usize]
    }

    fn encode(&self, v: u8) -> u8 {
        if self.reg_b() & REG_B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.reg_b() & REG_B_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.reg_b() & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | if hour >= 12 { HOUR_PM } else { 0 }
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.reg_b() & REG_B_24H != 0 {
            return self.decode(v);
        }
        let h12 = self.decode(v & !HOUR_PM) % 12;
        if v & HOUR_PM != 0 {
            h12 + 12
        } else {
            h12
        }
    }

    fn read_data(&mut self) -> u8 {
        let t = self.now();
        match self.index {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(t.weekday()),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u8),
            REG_CENTURY => self.encode(t.year.div_euclid(100).clamp(0, 99) as u8),
            REG_A => self.data[REG_A as usize] & !REG_A_UIP,
            // No interrupt sources: nothing is ever flagged.
            REG_C => 0,
            REG_D => REG_D_VRT,
            i => self.data[i as usize],
        }
    }

    fn set_time(&mut self, t: DateTime) {
        if self.reg_b() & REG_B_SET != 0 {
            self.latched = Some(t);
        } else {
            self.offset_secs = t.to_unix().saturating_sub((self.clock)());
        }
    }

    fn write_data(&mut self, v: u8) {
        let mut t = self.now();
        match self.index {
            REG_SECONDS => t.second = self.decode(v),
            REG_MINUTES => t.minute = self.decode(v),
            REG_HOURS => t.hour = self.decode_hour(v),
            REG_DAY => t.day = self.decode(v),
            REG_MONTH => t.month = self.decode(v),
            REG_YEAR => t.year = t.year.div_euclid(100) * 100 + i64::from(self.decode(v) % 100),
            REG_CENTURY => t.year = i64::from(self.decode(v)) * 100 + t.year.rem_euclid(100),
            // Derived from the date.
            REG_WEEKDAY => return,
            REG_A => {
                self.data[REG_A as usize] = v & !REG_A_UIP;
                return;
            }
            REG_B => {
                let was_set = self.reg_b() & REG_B_SET != 0;
                let now_set = v & REG_B_SET != 0;
                if !was_set && now_set {
                    self.latched = Some(self.now());
                }
                self.data[REG_B as usize] = v;
                if was_set && !now_set {
                    if let Some(t) = self.latched.take() {
                        self.set_time(t);
                    }
                }
                return;
            }
            REG_C | REG_D => {
                if self.ignored.allow() {
                    log::debug!("{}: ignoring write to read-only register", self.id);
                }
                return;
            }
            i => {
                self.data[i as usize] = v;
                return;
            }
        }
        self.set_time(t);
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            DATA_OFFSET => self.read_data(),
            // The index register is write-only.
            _ => 0xff,
        };
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            // Bit 7 masks NMIs on real hardware; KVM owns NMIs, so it is dropped.
            INDEX_OFFSET => self.index = data[0] & 0x7f,
            DATA_OFFSET => self.write_data(data[0]),
            _ => {}
        }
    }
}

impl Pausable for Cmos {}

impl Snapshottable for Cmos {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn snapshot(&mut self) -> Result<StateSection, StateError> {
        let mut w = StateWriter::new();
        w.u8(self.index).raw(&self.data).i64(self.offset_secs);
        match self.latched {
            Some(t) => w.u8(1).i64(t.to_unix()),
            None => w.u8(0).i64(0),
        };
        Ok(w.into_section(&self.id, CMOS_STATE_VERSION))
    }

    fn restore(&mut self, section: &StateSection) -> Result<(), StateError> {
        let mut r = StateReader::open(section, &self.id, CMOS_STATE_VERSION)?;
        let index = r.u8()?;
        let mut data = [0u8; CMOS_SIZE];
        data.copy_from_slice(r.raw(CMOS_SIZE)?);
        let offset_secs = r.i64()?;
        let has_latched = r.u8()?;
        let latched_secs = r.i64()?;
        if index as usize >= CMOS_SIZE {
            return Err(r.malformed(format!("index {index:#x} out of range")));
        }
        // Keep the arithmetic far from overflow.
        const LIMIT: i64 = 1 << 48;
        if !(-LIMIT..=LIMIT).contains(&offset_secs) || !(-LIMIT..=LIMIT).contains(&latched_secs) {
            return Err(r.malformed("clock offset out of range"));
        }
        let latched = match has_latched {
            0 => None,
            1 => Some(DateTime::from_unix(latched_secs)),
            v => return Err(r.malformed(format!("invalid latch flag {v}"))),
        };
        r.finish()?;
        self.index = index;
        self.data = data;
        self.offset_secs = offset_secs;
        self.latched = latched;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0x70, INDEX_OFFSET, &[reg | 0x80]); // NMI-disable bit set: ignored
        let mut b = [0];
        c.read(0x70, DATA_OFFSET, &mut b);
        b[0]
    }

    fn wr(c: &mut Cmos, reg: u8, v: u8) {
        c.write(0x70, INDEX_OFFSET, &[reg]);
        c.write(0x70, DATA_OFFSET, &[v]);
    }

    fn guest_time(c: &mut Cmos) -> i64 {
        let t = DateTime {
            year: i64::from(from_bcd(rd(c, REG_CENTURY))) * 100
                + i64::from(from_bcd(rd(c, REG_YEAR))),
            month: from_bcd(rd(c, REG_MONTH)),
            day: from_bcd(rd(c, REG_DAY)),
            hour: from_bcd(rd(c, REG_HOURS)),
            minute: from_bcd(rd(c, REG_MINUTES)),
            second: from_bcd(rd(c, REG_SECONDS)),
        };
        t.to_unix()
    }

    fn is_bcd(v: u8) -> bool {
        v >> 4 < 10 && v & 0xf < 10
    }

    #[test]
    fn calendar_conversions() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for secs in [0i64, 951_782_400, 1_709_164_800, 4_102_444_799, -86_400] {
            assert_eq!(DateTime::from_unix(secs).to_unix(), secs);
        }
        // 2024-02-29 was a Thursday (weekday 5 with Sunday = 1).
        let t = DateTime::from_unix(1_709_164_800);
        assert_eq!((t.year, t.month, t.day), (2024, 2, 29));
        assert_eq!(t.weekday(), 5);
    }

    #[test]
    fn bcd_time_is_plausible() {
        let mut c = Cmos::new(2 << 30, 0);
        assert_eq!(rd(&mut c, REG_B), REG_B_DEFAULT);
        assert_eq!(rd(&mut c, REG_A) & REG_A_UIP, 0);
        assert_eq!(rd(&mut c, REG_D), REG_D_VRT);
        for reg in [
            REG_SECONDS,
            REG_MINUTES,
            REG_HOURS,
            REG_WEEKDAY,
            REG_DAY,
            REG_MONTH,
            REG_YEAR,
            REG_CENTURY,
        ] {
            assert!(is_bcd(rd(&mut c, reg)), "register {reg:#x} is not BCD");
        }
        assert!((20..=99).contains(&from_bcd(rd(&mut c, REG_CENTURY))));
        assert!((1..=7).contains(&from_bcd(rd(&mut c, REG_WEEKDAY))));
        assert!((guest_time(&mut c) - host_now()).abs() <= 2);
    }

    #[test]
    fn guest_can_set_the_clock_with_set_bit() {
        let mut c = Cmos::new(0, 0);
        c.clock = || 1_700_000_000; // 2023-11-14 22:13:20
        wr(&mut c, REG_B, REG_B_DEFAULT | REG_B_SET);
        wr(&mut c, REG_YEAR, 0x01);
        wr(&mut c, REG_CENTURY, 0x20);
        wr(&mut c, REG_MONTH, 0x02);
        wr(&mut c, REG_DAY, 0x03);
        wr(&mut c, REG_HOURS, 0x04);
        wr(&mut c, REG_MINUTES, 0x05);
        wr(&mut c, REG_SECONDS, 0x06);
        // Nothing changes until SET is released... but reads show the latched time.
        assert_eq!(c.offset_secs, 0);
        wr(&mut c, REG_B, REG_B_DEFAULT);
        let want = DateTime {
            year: 2001,
            month: 2,
            day: 3,
            hour: 4,
            minute: 5,
            second: 6,
        };
        assert_eq!(guest_time(&mut c), want.to_unix());
        c.clock = || 1_700_000_010;
        assert_eq!(guest_time(&mut c), want.to_unix() + 10);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut c = Cmos::new(0, 0);
        c.clock = || 1_700_000_000; // 22:13:20
        wr(&mut c, REG_B, REG_B_BINARY);
        assert_eq!(rd(&mut c, REG_HOURS), 10 | HOUR_PM);
        assert_eq!(rd(&mut c, REG_MINUTES), 13);
        wr(&mut c, REG_HOURS, 12); // 12 AM
        wr(&mut c, REG_B, REG_B_BINARY | REG_B_24H);
        assert_eq!(rd(&mut c, REG_HOURS), 0);
    }

    #[test]
    fn memory_bytes_and_plain_storage() {
        let mut c = Cmos::new(3 << 30, 5 << 30);
        let lo = u16::from_le_bytes([rd(&mut c, 0x34), rd(&mut c, 0x35)]);
        assert_eq!(u64::from(lo), ((3 << 30) - 16 * MIB) / UNIT_64K);
        let hi = u32::from_le_bytes([rd(&mut c, 0x5B), rd(&mut c, 0x5C), rd(&mut c, 0x5D), 0]);
        assert_eq!(u64::from(hi), (5 << 30) / UNIT_64K);
        assert_eq!(
            u16::from_le_bytes([rd(&mut c, 0x30), rd(&mut c, 0x31)]),
            0xFFFF
        );
        wr(&mut c, 0x40, 0xab);
        assert_eq!(rd(&mut c, 0x40), 0xab);
        wr(&mut c, REG_C, 0xff);
        assert_eq!(rd(&mut c, REG_C), 0);
        wr(&mut c, REG_A, 0xff);
        assert_eq!(rd(&mut c, REG_A), 0x7f, "UIP is never set");
        // Index register reads back as 0xff; wide accesses are ignored.
        let mut b = [0];
        c.read(0x70, INDEX_OFFSET, &mut b);
        assert_eq!(b, [0xff]);
        let mut w = [0; 2];
        c.read(0x70, 0, &mut w);
        assert_eq!(w, [0xff; 2]);
        // Small RAM does not underflow.
        let mut small = Cmos::new(8 * MIB, 0);
        assert_eq!(rd(&mut small, 0x34), 0);
    }

    #[test]
    fn snapshot_round_trip_and_bad_state() {
        let mut c = Cmos::new(1 << 30, 0);
        c.clock = || 1_700_000_000;
        wr(&mut c, 0x50, 0x42);
        wr(&mut c, REG_YEAR, 0x30);
        c.pause().unwrap();
        let snap = c.snapshot().unwrap();

        let mut d = Cmos::new(0, 0);
        d.clock = || 1_700_000_000;
        d.restore(&snap).unwrap();
        assert_eq!(rd(&mut d, 0x50), 0x42);
        assert_eq!(rd(&mut d, REG_YEAR), 0x30);
        assert_eq!(d.data, c.data);

        let mut bad = snap.clone();
        bad.data.truncate(100);
        assert!(d.restore(&bad).is_err());
        let mut bad = snap.clone();
        bad.data.push(0);
        assert!(d.restore(&bad).is_err());
        let mut bad = snap.clone();
        bad.version = 3;
        assert!(d.restore(&bad).is_err());
        let mut bad = snap.clone();
        bad.data[0] = 0x80;
        assert!(d.restore(&bad).is_err());
        let mut bad = snap;
        let off = 1 + CMOS_SIZE;
        bad.data[off..off + 8].copy_from_slice(&i64::MAX.to_le_bytes());
        assert!(d.restore(&bad).is_err());
    }
}
