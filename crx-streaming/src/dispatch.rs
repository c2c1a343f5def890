//! The frame reader loop both protocols share: it reads the client's SPDY frames until the
//! connection ends (cleanly between frames, by GOAWAY, or on a read or write error), answers
//! PINGs, passes over the frames neither protocol uses, and hands every stream event to the
//! session's [`Router`], which routes streams the protocol's way.

use std::io::{self, Read};

use crate::spdy::{Frame, FrameReader};
use crate::{lock, SharedWriter};

/// Where one session's stream events go. An `Err` from a method is a failed write to the
/// client, and ends the connection.
pub(crate) trait Router {
    /// The client opened `stream_id` with `headers` (names lower-cased): the router accepts it
    /// (SYN_REPLY, before it lets anything write on the stream) or refuses it (RST_STREAM). A
    /// FIN on the SYN_STREAM itself is not reported.
    fn on_stream(&mut self, stream_id: u32, headers: &[(String, String)]) -> io::Result<()>;

    /// Data the client sent on `stream_id`, which the router may not know; empty when a DATA
    /// frame only carries a FIN.
    fn on_data(&mut self, stream_id: u32, data: Vec<u8>) -> io::Result<()>;

    /// The client half-closed `stream_id` (a DATA frame's FIN, reported after its data).
    fn on_fin(&mut self, stream_id: u32);

    /// The client reset `stream_id` (RST_STREAM, whatever its status).
    fn on_reset(&mut self, stream_id: u32);
}

/// Reads `input`'s frames into `router` until the connection ends; `writer` answers PINGs and
/// `label` names the connection in logs.
pub(crate) fn read_frames(
    input: impl Read,
    writer: &SharedWriter,
    router: &mut impl Router,
    label: &str,
) {
    let mut frames = FrameReader::new(input);
    loop {
        let frame = match frames.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("{label}: {e}");
                return;
            }
        };
        let answered = match frame {
            Frame::SynStream {
                stream_id, headers, ..
            } => router.on_stream(stream_id, &headers),
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                let routed = router.on_data(stream_id, data);
                if fin {
                    router.on_fin(stream_id);
                }
                routed
            }
            Frame::RstStream { stream_id, .. } => {
                router.on_reset(stream_id);
                Ok(())
            }
            Frame::Ping { id } => lock(writer).ping(id),
            Frame::GoAway => return,
            // A client opens the streams, so it has nothing to accept; SETTINGS, HEADERS,
            // WINDOW_UPDATE and the rest carry nothing either protocol uses.
            Frame::SynReply { .. } | Frame::Ignored { .. } => Ok(()),
        };
        if let Err(e) = answered {
            tracing::debug!("{label}: writing: {e}");
            return;
        }
    }
}
