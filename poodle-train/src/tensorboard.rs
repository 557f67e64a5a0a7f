//! TensorBoard event files written in the documented format, so that `tensorboard --logdir
//! runs/` shows every run's curves side by side. A file is a sequence of TFRecords (u64 length,
//! masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes), each one serialised
//! `tensorflow.Event` protobuf: the first holds `file_version = "brain.Event:2"`, the others
//! one `Summary` of scalar values (`tag`, `simple_value`) at a step. Each run writes its own
//! file `RUN_DIR/tb/events.out.tfevents.<unix time>.<host>.<pid>.<ns>`; a resumed run starts after
//! its checkpoint's step and TensorBoard drops the older file's steps beyond it (its
//! out-of-order purge), so the curves continue without duplicates.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Appends scalar events to one event file.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field.
fn bytes_field(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(field << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1, step = 2, file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: u64, body: (u64, &[u8])) -> Vec<u8> {
    let mut e = Vec::new();
    varint(1 << 3 | 1, &mut e);
    e.extend_from_slice(&wall_time.to_le_bytes());
    varint(2 << 3, &mut e);
    varint(step, &mut e);
    bytes_field(body.0, body.1, &mut e);
    e
}

/// `Summary { repeated Value value = 1 }`, `Value { tag = 1, simple_value = 2 (float) }`.
fn summary(values: &[(&str, f32)]) -> Vec<u8> {
    let mut s = Vec::new();
    for (tag, v) in values {
        let mut val = Vec::new();
        bytes_field(1, tag.as_bytes(), &mut val);
        varint(2 << 3 | 5, &mut val);
        val.extend_from_slice(&v.to_le_bytes());
        bytes_field(1, &val, &mut s);
    }
    s
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if needed) and writes its version record.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        let t = now();
        // Seconds, host and pid as TensorBoard's own writers name them, then the nanoseconds
        // (zero-padded, so names sort by time) for two runs of one process in one second.
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}.{:09}",
            t as u64,
            std::process::id(),
            (t.fract() * 1e9) as u64
        ));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let mut w = EventWriter { file, path };
        w.record(&event(t, 0, (3, b"brain.Event:2")))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&rec)
    }

    /// Scalars at `step` (one event), flushed so that a live TensorBoard sees them.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f32)]) -> std::io::Result<()> {
        self.record(&event(now(), step, (5, &summary(values))))?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_framed_with_masked_crc32c() {
        // The CRC-32C check value of "123456789" is 0xE3069283; masking rotates it right by
        // 15 bits and adds 0xa282ead8.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
        let mut v = Vec::new();
        varint(300, &mut v);
        assert_eq!(v, [0xAC, 0x02]);
        let d = std::env::temp_dir().join(format!("poodle-tb-{}", std::process::id()));
        let mut w = EventWriter::create(&d).unwrap();
        w.scalars(7, &[("loss/total", 0.5)]).unwrap();
        let b = std::fs::read(w.path()).unwrap();
        let len = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        assert_eq!(
            u32::from_le_bytes(b[8..12].try_into().unwrap()),
            masked_crc(&b[..8])
        );
        let data = &b[12..12 + len];
        assert!(data.ends_with(b"brain.Event:2"));
        let crc = u32::from_le_bytes(b[12 + len..16 + len].try_into().unwrap());
        assert_eq!(crc, masked_crc(data));
        std::fs::remove_dir_all(d).unwrap();
    }
}
