//! Length-delimited framing: a 4-byte big-endian length, then a protobuf body of at most
//! [`MAX_FRAME_LEN`] bytes, over any blocking `Read`/`Write`.

use std::io::{self, Read, Write};

use prost::Message;

use crate::MAX_FRAME_LEN;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("frame body is not a valid message: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// The frame for `msg` (length prefix + body) as one buffer.
pub fn encode_frame<M: Message>(msg: &M) -> Result<Vec<u8>, FrameError> {
    let len = msg.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf)
        .expect("a Vec grows to fit the message");
    Ok(buf)
}

/// Writes `msg` as one frame (a single `write_all`, so frames from threads sharing a stream
/// behind a lock never interleave).
pub fn write_frame<W: Write + ?Sized, M: Message>(w: &mut W, msg: &M) -> Result<(), FrameError> {
    w.write_all(&encode_frame(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame; `Ok(None)` if the stream ended cleanly before a frame started.
pub fn read_frame<R: Read + ?Sized, M: Message + Default>(
    r: &mut R,
) -> Result<Option<M>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(Some(M::decode(body.as_slice())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{request, Hello, Request, Response, StdioOutput};

    fn hello(id: u64) -> Request {
        Request {
            id,
            kind: Some(request::Kind::Hello(Hello {
                protocol_version: crate::PROTOCOL_VERSION,
                entropy: Vec::new(),
            })),
        }
    }

    #[test]
    fn frames_round_trip_back_to_back() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &hello(1)).unwrap();
        write_frame(&mut buf, &hello(2)).unwrap();
        assert_eq!(&buf[..4], &(hello(1).encoded_len() as u32).to_be_bytes());
        let mut r = buf.as_slice();
        assert_eq!(read_frame::<_, Request>(&mut r).unwrap(), Some(hello(1)));
        assert_eq!(read_frame::<_, Request>(&mut r).unwrap(), Some(hello(2)));
        assert!(read_frame::<_, Request>(&mut r).unwrap().is_none());
    }

    #[test]
    fn empty_message_is_a_zero_length_frame() {
        let frame = encode_frame(&Response::default()).unwrap();
        assert_eq!(frame, [0, 0, 0, 0]);
        let got: Response = read_frame(&mut frame.as_slice()).unwrap().unwrap();
        assert_eq!(got, Response::default());
    }

    #[test]
    fn oversized_length_is_refused_before_reading_the_body() {
        let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        let err = read_frame::<_, Request>(&mut header.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, .. } if len == MAX_FRAME_LEN + 1));
        let big = StdioOutput {
            kind: Some(crate::stdio_output::Kind::Stdout(vec![0; MAX_FRAME_LEN])),
        };
        assert!(matches!(
            encode_frame(&big),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_and_garbage_frames_are_errors() {
        let frame = encode_frame(&hello(7)).unwrap();
        for cut in [1, 3, 5, frame.len() - 1] {
            let err = read_frame::<_, Request>(&mut &frame[..cut]).unwrap_err();
            assert!(matches!(err, FrameError::Truncated), "cut at {cut}: {err}");
        }
        let garbage = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        let err = read_frame::<_, Request>(&mut garbage.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err}");
    }
}
