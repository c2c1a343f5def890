//! SPDY/3.1 framing, as much as a server of kubelet's streams needs: reading every frame type,
//! writing SYN_REPLY, DATA, RST_STREAM, PING and GOAWAY, and the header blocks (zlib with the
//! protocol's dictionary, one compression context per direction for the whole connection).
//!
//! Flow control is not enforced (the Go client, moby/spdystream, neither sends nor honours
//! WINDOW_UPDATE); every length a peer sends is checked before it is trusted.

use std::io::{self, Read, Write};
use std::sync::OnceLock;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::StreamingError;

const VERSION: u16 = 3;
const FLAG_FIN: u8 = 0x01;

/// The largest header block, decompressed, a peer may send.
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The largest number of name/value pairs in one header block.
const MAX_HEADERS: u32 = 256;

/// The control frame types (SPDY/3 section 2.6) this server reads or writes; the others
/// (SETTINGS, WINDOW_UPDATE, ...) are read and ignored.
mod control {
    pub const SYN_STREAM: u16 = 1;
    pub const SYN_REPLY: u16 = 2;
    pub const RST_STREAM: u16 = 3;
    pub const PING: u16 = 6;
    pub const GOAWAY: u16 = 7;
    pub const HEADERS: u16 = 8;
}

/// RST_STREAM status codes this server sends.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_REFUSED_STREAM: u32 = 3;

/// One frame from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        fin: bool,
        headers: Vec<(String, String)>,
    },
    /// The peer accepted a stream this side opened.
    SynReply {
        stream_id: u32,
    },
    Data {
        stream_id: u32,
        fin: bool,
        data: Vec<u8>,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Ping {
        id: u32,
    },
    GoAway,
    /// SETTINGS, HEADERS, WINDOW_UPDATE and types this server has no use for.
    Ignored {
        kind: u16,
    },
}

/// The header compression dictionary of SPDY/3 (section 2.6.10.1): length-prefixed header
/// names and common values, then a raw tail of status codes, dates and content types.
fn dictionary() -> &'static [u8] {
    static DICTIONARY: OnceLock<Vec<u8>> = OnceLock::new();
    DICTIONARY.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = concat!(
            "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
            "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently",
            "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error",
            "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct ",
            "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,",
            "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,",
            "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=",
            "iso-8859-1,utf-,*,enq=0.",
        );
        let mut dictionary = Vec::new();
        for word in WORDS {
            dictionary.extend_from_slice(&(word.len() as u32).to_be_bytes());
            dictionary.extend_from_slice(word.as_bytes());
        }
        dictionary.extend_from_slice(TAIL.as_bytes());
        dictionary
    })
}

/// Reads frames, decompressing header blocks with the connection's inbound context.
pub struct FrameReader<R> {
    input: R,
    inflate: Decompress,
}

impl<R: Read> FrameReader<R> {
    pub fn new(input: R) -> Self {
        FrameReader {
            input,
            inflate: Decompress::new(true),
        }
    }

    /// The next frame; `None` at a clean end of the connection between frames.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, StreamingError> {
        let mut head = [0u8; 8];
        match self.input.read_exact(&mut head[..1]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        self.input.read_exact(&mut head[1..])?;
        let flags = head[4];
        let length = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let mut payload = vec![0u8; length];
        self.input.read_exact(&mut payload)?;
        if head[0] & 0x80 == 0 {
            return Ok(Some(Frame::Data {
                stream_id: u32::from_be_bytes(head[..4].try_into().expect("4 bytes")),
                fin: flags & FLAG_FIN != 0,
                data: payload,
            }));
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != VERSION {
            return Err(StreamingError::Protocol(format!(
                "SPDY version {version}, not {VERSION}"
            )));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let word = |at: usize| -> Result<u32, StreamingError> {
            payload
                .get(at..at + 4)
                .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
                .ok_or_else(|| {
                    StreamingError::Protocol(format!("control frame {kind} is too short"))
                })
        };
        Ok(Some(match kind {
            control::SYN_STREAM => {
                let stream_id = word(0)? & 0x7fff_ffff;
                // Stream ID, associated stream ID, priority and slot, then the header block.
                let block = payload.get(10..).ok_or_else(|| {
                    StreamingError::Protocol("SYN_STREAM is too short".to_owned())
                })?;
                let headers = self.headers(block)?;
                Frame::SynStream {
                    stream_id,
                    fin: flags & FLAG_FIN != 0,
                    headers,
                }
            }
            control::SYN_REPLY | control::HEADERS => {
                // Their header blocks still advance the inbound compression context.
                let block = payload.get(4..).unwrap_or_default();
                self.headers(block)?;
                match kind {
                    control::SYN_REPLY => Frame::SynReply {
                        stream_id: word(0)? & 0x7fff_ffff,
                    },
                    _ => Frame::Ignored { kind },
                }
            }
            control::RST_STREAM => Frame::RstStream {
                stream_id: word(0)? & 0x7fff_ffff,
                status: word(4)?,
            },
            control::PING => Frame::Ping { id: word(0)? },
            control::GOAWAY => Frame::GoAway,
            _ => Frame::Ignored { kind },
        }))
    }

    /// Decompresses and parses one header block: a count, then length-prefixed names and
    /// values (a value may hold several, NUL-separated; each becomes a pair).
    fn headers(&mut self, block: &[u8]) -> Result<Vec<(String, String)>, StreamingError> {
        let mut plain = Vec::with_capacity(4 * block.len() + 64);
        let mut consumed = 0;
        loop {
            if plain.len() == plain.capacity() {
                if plain.len() >= MAX_HEADER_BLOCK {
                    return Err(StreamingError::Protocol(
                        "a header block is larger than 64 KiB".to_owned(),
                    ));
                }
                plain.reserve(plain.len());
            }
            let before = self.inflate.total_in();
            let result =
                self.inflate
                    .decompress_vec(&block[consumed..], &mut plain, FlushDecompress::Sync);
            consumed += (self.inflate.total_in() - before) as usize;
            match result {
                Ok(Status::Ok | Status::BufError) if consumed == block.len() => {
                    if plain.len() < plain.capacity() {
                        break;
                    }
                }
                Ok(Status::Ok | Status::BufError) => {}
                Ok(Status::StreamEnd) => break,
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(dictionary())
                        .map_err(|e| StreamingError::Protocol(format!("header dictionary: {e}")))?;
                }
                Err(e) => {
                    return Err(StreamingError::Protocol(format!("header block: {e}")));
                }
            }
        }
        parse_header_block(&plain)
    }
}

fn parse_header_block(plain: &[u8]) -> Result<Vec<(String, String)>, StreamingError> {
    let short = || StreamingError::Protocol("a header block ends early".to_owned());
    let count = plain.get(..4).ok_or_else(short)?;
    let count = u32::from_be_bytes(count.try_into().expect("4 bytes"));
    if count > MAX_HEADERS {
        return Err(StreamingError::Protocol(format!(
            "{count} headers in one block"
        )));
    }
    let mut at = 4;
    let mut word = || -> Result<&[u8], StreamingError> {
        let length = plain.get(at..at + 4).ok_or_else(short)?;
        let length = u32::from_be_bytes(length.try_into().expect("4 bytes")) as usize;
        let bytes = plain
            .get(at + 4..(at + 4).saturating_add(length))
            .ok_or_else(short)?;
        at += 4 + length;
        Ok(bytes)
    };
    let mut headers = Vec::new();
    for _ in 0..count {
        let name = String::from_utf8_lossy(word()?).to_ascii_lowercase();
        let values = word()?;
        for value in values.split(|&b| b == 0) {
            headers.push((name.clone(), String::from_utf8_lossy(value).into_owned()));
        }
    }
    Ok(headers)
}

/// Writes frames, compressing header blocks with the connection's outbound context.
pub struct FrameWriter<W> {
    output: W,
    deflate: Compress,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(output: W) -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(dictionary())
            .expect("a fresh zlib stream takes a dictionary");
        FrameWriter { output, deflate }
    }

    fn control(&mut self, kind: u16, flags: u8, payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(8 + payload.len());
        frame.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
        frame.extend_from_slice(&kind.to_be_bytes());
        frame.push(flags);
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        frame.extend_from_slice(payload);
        self.output.write_all(&frame)?;
        self.output.flush()
    }

    /// Opens a stream with `headers` (the client's side of a session).
    pub fn syn_stream(&mut self, stream_id: u32, headers: &[(&str, &str)]) -> io::Result<()> {
        let mut payload = stream_id.to_be_bytes().to_vec();
        // No associated stream, priority 0, slot 0.
        payload.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        payload.extend(self.header_block(headers)?);
        self.control(control::SYN_STREAM, 0, &payload)
    }

    /// Accepts the peer's stream, with no headers.
    pub fn syn_reply(&mut self, stream_id: u32) -> io::Result<()> {
        let mut payload = stream_id.to_be_bytes().to_vec();
        payload.extend(self.header_block(&[])?);
        self.control(control::SYN_REPLY, 0, &payload)
    }

    /// Sends `data` on the stream, in frames of at most 32 KiB; `fin` half-closes it after.
    pub fn data(&mut self, stream_id: u32, data: &[u8], fin: bool) -> io::Result<()> {
        const CHUNK: usize = 32 * 1024;
        let mut chunks = data.chunks(CHUNK).peekable();
        if chunks.peek().is_none() {
            return self.data_frame(stream_id, &[], fin);
        }
        while let Some(chunk) = chunks.next() {
            self.data_frame(stream_id, chunk, fin && chunks.peek().is_none())?;
        }
        Ok(())
    }

    fn data_frame(&mut self, stream_id: u32, data: &[u8], fin: bool) -> io::Result<()> {
        let mut frame = Vec::with_capacity(8 + data.len());
        frame.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
        frame.push(if fin { FLAG_FIN } else { 0 });
        frame.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        frame.extend_from_slice(data);
        self.output.write_all(&frame)?;
        self.output.flush()
    }

    pub fn rst_stream(&mut self, stream_id: u32, status: u32) -> io::Result<()> {
        let mut payload = stream_id.to_be_bytes().to_vec();
        payload.extend_from_slice(&status.to_be_bytes());
        self.control(control::RST_STREAM, 0, &payload)
    }

    pub fn ping(&mut self, id: u32) -> io::Result<()> {
        self.control(control::PING, 0, &id.to_be_bytes())
    }

    /// Ends the session: no stream after `last_stream_id` will be processed.
    pub fn goaway(&mut self, last_stream_id: u32) -> io::Result<()> {
        let mut payload = last_stream_id.to_be_bytes().to_vec();
        payload.extend_from_slice(&0u32.to_be_bytes());
        self.control(control::GOAWAY, 0, &payload)
    }

    fn header_block(&mut self, headers: &[(&str, &str)]) -> io::Result<Vec<u8>> {
        let mut plain = (headers.len() as u32).to_be_bytes().to_vec();
        for (name, value) in headers {
            for word in [name.to_ascii_lowercase().as_bytes(), value.as_bytes()] {
                plain.extend_from_slice(&(word.len() as u32).to_be_bytes());
                plain.extend_from_slice(word);
            }
        }
        let mut compressed = Vec::with_capacity(plain.len() + 64);
        let mut consumed = 0;
        loop {
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(&plain[consumed..], &mut compressed, FlushCompress::Sync)
                .map_err(io::Error::other)?;
            consumed += (self.deflate.total_in() - before) as usize;
            // A sync flush is complete once it left room in the output.
            if consumed == plain.len() && compressed.len() < compressed.capacity() {
                return Ok(compressed);
            }
            compressed.reserve(compressed.capacity().max(64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames as a peer writes them: a writer's header blocks read back through a reader.
    #[test]
    fn header_blocks_round_trip_across_frames_sharing_one_zlib_context() {
        let mut wire = Vec::new();
        let mut writer = FrameWriter::new(&mut wire);
        for (id, kind) in [(1, "error"), (3, "stdout"), (5, "stderr")] {
            writer
                .syn_stream(id, &[("streamType", kind), ("x-multi", "a\0b")])
                .unwrap();
        }
        writer.data(3, b"hello", true).unwrap();
        writer.ping(7).unwrap();
        let mut reader = FrameReader::new(wire.as_slice());
        for (id, kind) in [(1, "error"), (3, "stdout"), (5, "stderr")] {
            assert_eq!(
                reader.next_frame().unwrap(),
                Some(Frame::SynStream {
                    stream_id: id,
                    fin: false,
                    headers: vec![
                        ("streamtype".into(), kind.into()),
                        ("x-multi".into(), "a".into()),
                        ("x-multi".into(), "b".into()),
                    ],
                })
            );
        }
        assert_eq!(
            reader.next_frame().unwrap(),
            Some(Frame::Data {
                stream_id: 3,
                fin: true,
                data: b"hello".to_vec()
            })
        );
        assert_eq!(reader.next_frame().unwrap(), Some(Frame::Ping { id: 7 }));
        assert_eq!(reader.next_frame().unwrap(), None);
    }

    #[test]
    fn the_dictionary_is_the_protocols() {
        let dictionary = dictionary();
        assert_eq!(dictionary.len(), 1423);
        assert_eq!(&dictionary[..11], b"\0\0\0\x07options");
        assert!(dictionary.ends_with(b",enq=0."));
    }

    #[test]
    fn hostile_frames_are_refused_not_trusted() {
        // A SYN_STREAM whose header block is not zlib.
        let mut frame = vec![0x80, 3, 0, 1, 0, 0, 0, 14];
        frame.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]);
        assert!(FrameReader::new(frame.as_slice()).next_frame().is_err());
        // A control frame too short for its fields.
        let frame = [0x80, 3, 0, 3, 0, 0, 0, 2, 0, 0];
        assert!(FrameReader::new(frame.as_slice()).next_frame().is_err());
        // Another protocol version.
        let frame = [0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1];
        assert!(FrameReader::new(frame.as_slice()).next_frame().is_err());
        // A frame cut short.
        let frame = [0, 0, 0, 1, 0, 0, 0, 9, 1];
        assert!(FrameReader::new(frame.as_slice()).next_frame().is_err());
        // A header block claiming more headers than it holds.
        assert!(parse_header_block(&[0, 0, 0, 2, 0, 0, 0, 1, b'a', 0, 0, 0, 0]).is_err());
        assert!(parse_header_block(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
