//! Deterministic FAT volumes built in-process (the EFI system partition, and
//! NoCloud seeds): fixed volume id and timestamps, files in a given order.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

/// A window `[start, start+len)` of a file, seen as a whole device.
pub(crate) struct Slice<'a> {
    file: &'a mut File,
    start: u64,
    len: u64,
    pos: u64,
}

impl<'a> Slice<'a> {
    pub(crate) fn new(file: &'a mut File, start: u64, len: u64) -> Self {
        Slice {
            file,
            start,
            len,
            pos: 0,
        }
    }
}

impl Read for Slice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let k = self.file.read(&mut buf[..n])?;
        self.pos += k as u64;
        Ok(k)
    }
}

impl Write for Slice<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the FAT volume",
            ));
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let k = self.file.write(&buf[..n])?;
        self.pos += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Seek for Slice<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::End(d) => self.len as i128 + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if new < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the FAT volume",
            ));
        }
        self.pos = new as u64;
        Ok(self.pos)
    }
}

#[derive(Debug)]
struct FixedTime(fatfs::DateTime);

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.0
    }
}

/// FAT's date and time (UTC) of a Unix timestamp, clamped to FAT's range.
fn fat_time(epoch: u64) -> fatfs::DateTime {
    let c = crate::util::civil(epoch.max(315_532_800)); // 1980-01-01, FAT's first day
    fatfs::DateTime {
        date: fatfs::Date {
            year: c.year.min(2107) as u16,
            month: c.month as u16,
            day: c.day as u16,
        },
        time: fatfs::Time {
            hour: c.hour as u16,
            min: c.minute as u16,
            sec: c.second as u16,
            millis: 0,
        },
    }
}

/// Format `[start, start+len)` of `file` as FAT with `label` and `volume_id`,
/// and write `files` (paths like `EFI/BOOT/BOOTX64.EFI`) with every timestamp
/// set to `epoch`. The same inputs give the same bytes.
pub(crate) fn write_volume(
    file: &mut File,
    start: u64,
    len: u64,
    label: &str,
    volume_id: u32,
    epoch: u64,
    files: &[(String, Vec<u8>)],
) -> Result<()> {
    let mut label_bytes = [b' '; 11];
    for (i, b) in label.bytes().take(11).enumerate() {
        label_bytes[i] = b.to_ascii_uppercase();
    }
    {
        let mut slice = Slice::new(file, start, len);
        // Zero the first MiB so stale boot sectors never survive.
        let zeros = vec![0u8; (1 << 20).min(len as usize)];
        slice.write_all(&zeros)?;
        slice.seek(SeekFrom::Start(0))?;
        fatfs::format_volume(
            &mut slice,
            fatfs::FormatVolumeOptions::new()
                .volume_label(label_bytes)
                .volume_id(volume_id),
        )
        .context("cannot format the FAT volume")?;
    }
    let provider: &'static FixedTime = Box::leak(Box::new(FixedTime(fat_time(epoch))));
    let slice = Slice::new(file, start, len);
    let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new().time_provider(provider))
        .context("cannot open the new FAT volume")?;
    {
        let root = fs.root_dir();
        for (path, data) in files {
            let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
            let (name, dirs) = parts
                .split_last()
                .context("empty file name for the FAT volume")?;
            let mut dir = root.clone();
            for d in dirs {
                dir = match dir.open_dir(d) {
                    Ok(x) => x,
                    Err(_) => dir
                        .create_dir(d)
                        .with_context(|| format!("cannot create {d} on the FAT volume"))?,
                };
            }
            let mut f = dir
                .create_file(name)
                .with_context(|| format!("cannot create {path} on the FAT volume"))?;
            f.truncate()?;
            f.write_all(data).with_context(|| {
                format!("cannot write {path} on the FAT volume (is it large enough?)")
            })?;
        }
    }
    fs.unmount().context("cannot finish the FAT volume")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(epoch: u64) -> Vec<u8> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v");
        let mut f = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(4 << 20).unwrap();
        let files = vec![
            ("EFI/BOOT/grub.cfg".to_string(), b"set timeout=0\n".to_vec()),
            ("EFI/BOOT/BOOTX64.EFI".to_string(), vec![7u8; 3000]),
        ];
        write_volume(&mut f, 0, 4 << 20, "cidata", 0x1234_5678, epoch, &files).unwrap();
        std::fs::read(p).unwrap()
    }

    #[test]
    fn same_inputs_give_identical_volumes() {
        assert_eq!(
            crate::util::sha256_hex(&build(1_700_000_000)),
            crate::util::sha256_hex(&build(1_700_000_000))
        );
        assert_ne!(
            crate::util::sha256_hex(&build(1_700_000_000)),
            crate::util::sha256_hex(&build(1_800_000_000))
        );
    }

    #[test]
    fn files_can_be_read_back() {
        let bytes = build(1_700_000_000);
        let fs = fatfs::FileSystem::new(io::Cursor::new(bytes), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        let mut s = String::new();
        fs.root_dir()
            .open_file("EFI/BOOT/grub.cfg")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "set timeout=0\n");
    }

    #[test]
    fn epoch_converts_to_civil_time() {
        let t = fat_time(1_700_000_000); // 2023-11-14 22:13:20 UTC
        assert_eq!((t.date.year, t.date.month, t.date.day), (2023, 11, 14));
        assert_eq!((t.time.hour, t.time.min, t.time.sec), (22, 13, 20));
    }
}
