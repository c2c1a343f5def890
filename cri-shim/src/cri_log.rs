//! Container logs in the CRI log format kubelet and `crictl logs` read: one line per line of
//! output, `<RFC3339Nano UTC time> <stdout|stderr> <F|P> <text>`, `P` marking a piece of a
//! line longer than [`MAX_LINE`] (or cut by the end of the stream) and `F` its last piece.
//! [`ContainerLog`] is the open file, shared between the thread that writes it and
//! ReopenContainerLog (which reopens the path after kubelet rotated the file).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest piece written as one log line.
pub const MAX_LINE: usize = 16 * 1024;

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A container's log file.
pub struct ContainerLog {
    path: PathBuf,
    file: Mutex<File>,
}

fn open(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl ContainerLog {
    pub fn open(path: &Path) -> io::Result<ContainerLog> {
        Ok(ContainerLog {
            path: path.to_owned(),
            file: Mutex::new(open(path)?),
        })
    }

    /// Opens the path anew (after a rotation moved the old file away).
    pub fn reopen(&self) -> io::Result<()> {
        let file = open(&self.path)?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = file;
        Ok(())
    }

    fn write_line(&self, stream: Stream, partial: bool, text: &[u8]) {
        let mut line = format!(
            "{} {} {} ",
            rfc3339_nano(SystemTime::now()),
            stream.name(),
            if partial { "P" } else { "F" }
        )
        .into_bytes();
        line.extend_from_slice(text);
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(&line) {
            tracing::warn!(path = %self.path.display(), "writing the container log: {e}");
        }
    }
}

/// Cuts one stream's output into log lines, holding an unfinished line until its end comes.
#[derive(Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Writes every complete line of `pending + data`, and pieces of [`MAX_LINE`] as partial.
    pub fn push(&mut self, log: &ContainerLog, stream: Stream, data: &[u8]) {
        self.pending.extend_from_slice(data);
        let mut start = 0;
        while let Some(nl) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let end = start + nl;
            let line = &self.pending[start..end];
            let mut chunks = line.chunks(MAX_LINE).peekable();
            if line.is_empty() {
                log.write_line(stream, false, b"");
            }
            while let Some(chunk) = chunks.next() {
                log.write_line(stream, chunks.peek().is_some(), chunk);
            }
            start = end + 1;
        }
        self.pending.drain(..start);
        while self.pending.len() >= MAX_LINE {
            let rest = self.pending.split_off(MAX_LINE);
            log.write_line(stream, true, &self.pending);
            self.pending = rest;
        }
    }

    /// The stream ended: what is left is written as the last piece of its line.
    pub fn finish(&mut self, log: &ContainerLog, stream: Stream) {
        if !self.pending.is_empty() {
            log.write_line(stream, false, &self.pending);
            self.pending.clear();
        }
    }
}

/// `2006-01-02T15:04:05.999999999Z` (UTC, nanoseconds always written).
pub fn rfc3339_nano(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_nano_utc() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(rfc3339_nano(t), "2023-11-14T22:13:20.000000005Z");
        assert_eq!(rfc3339_nano(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&rfc3339_nano(leap)[..10], "2000-02-29");
    }

    #[test]
    fn lines_partials_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod/c/0.log");
        let log = ContainerLog::open(&path).unwrap();
        let mut out = LineSplitter::default();
        let mut err = LineSplitter::default();
        out.push(&log, Stream::Stdout, b"hello\nwor");
        err.push(&log, Stream::Stderr, b"oops\n");
        out.push(&log, Stream::Stdout, b"ld\n\n");
        let long = vec![b'x'; MAX_LINE + 3];
        out.push(&log, Stream::Stdout, &long);
        out.push(&log, Stream::Stdout, b"\n");
        out.push(&log, Stream::Stdout, b"tail");
        out.finish(&log, Stream::Stdout);
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<(&str, &str, &str)> = text
            .lines()
            .map(|l| {
                let mut f = l.splitn(4, ' ');
                let time = f.next().unwrap();
                assert!(time.ends_with('Z') && time.len() == 30, "{time}");
                (f.next().unwrap(), f.next().unwrap(), f.next().unwrap_or(""))
            })
            .collect();
        let x = "x".repeat(MAX_LINE);
        assert_eq!(
            lines,
            [
                ("stdout", "F", "hello"),
                ("stderr", "F", "oops"),
                ("stdout", "F", "world"),
                ("stdout", "F", ""),
                ("stdout", "P", x.as_str()),
                ("stdout", "F", "xxx"),
                ("stdout", "F", "tail"),
            ]
        );
        fs::rename(&path, dir.path().join("rotated")).unwrap();
        log.reopen().unwrap();
        out.push(&log, Stream::Stdout, b"after\n");
        assert!(fs::read_to_string(&path)
            .unwrap()
            .contains("stdout F after"));
    }
}
