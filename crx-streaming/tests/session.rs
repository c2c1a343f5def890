//! The streaming server end to end on loopback, with a client written from the crate's own
//! framing (crictl and critest, client-go's executor, drive it in crx-cri's tests): the
//! upgrade, a whole exec session, port forwarding to a TCP server of the test's, and what it
//! refuses.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crx_streaming::spdy::{Frame, FrameReader, FrameWriter};
use crx_streaming::{Handler, PortConnection, Request, RequestKind, StreamingServer, Streams};

/// Upper-cases stdin onto stdout, says "err" on stderr, exits 3; forwards pod "p1"'s ports to
/// the same ports on 127.0.0.1.
struct Shout;

impl Handler for Shout {
    fn serve(&self, request: Request, streams: Streams) -> Result<i32, String> {
        assert_eq!(
            request.kind,
            RequestKind::Exec {
                cmd: vec!["shout".into()]
            }
        );
        let stdin = streams.stdin.expect("stdin was asked for");
        let stdout = streams.stdout.expect("stdout was asked for");
        while let Some(chunk) = stdin.next_chunk() {
            stdout
                .write(&chunk.to_ascii_uppercase())
                .map_err(|e| e.to_string())?;
        }
        streams
            .stderr
            .expect("stderr was asked for")
            .write(b"err")
            .map_err(|e| e.to_string())?;
        Ok(3)
    }

    fn forward(&self, sandbox_id: &str, port: u16) -> Result<Box<dyn PortConnection>, String> {
        assert_eq!(sandbox_id, "p1");
        let conn = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        Ok(Box::new(conn))
    }
}

fn server() -> Arc<StreamingServer> {
    StreamingServer::start("127.0.0.1:0".parse().unwrap(), Arc::new(Shout)).unwrap()
}

fn exec_request() -> Request {
    Request {
        kind: RequestKind::Exec {
            cmd: vec!["shout".into()],
        },
        target_id: "c1".into(),
        tty: false,
        stdin: true,
        stdout: true,
        stderr: true,
    }
}

/// Sends the upgrade request for `url` with `protocol`; returns the connection and the
/// response head.
fn upgrade(url: &str, protocol: &str) -> (TcpStream, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (address, path) = rest.split_at(rest.find('/').unwrap());
    let mut conn = TcpStream::connect(address).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    (conn, String::from_utf8(head).unwrap())
}

#[test]
fn an_exec_session_carries_stdin_stdout_stderr_and_the_exit_code() {
    let server = server();
    let url = server.url(exec_request()).unwrap();
    let (conn, head) = upgrade(&url, "v4.channel.k8s.io");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("X-Stream-Protocol-Version: v4.channel.k8s.io"),
        "{head}"
    );

    let mut writer = FrameWriter::new(conn.try_clone().unwrap());
    let mut reader = FrameReader::new(conn);
    for (id, kind) in [(1, "error"), (3, "stdin"), (5, "stdout"), (7, "stderr")] {
        writer.syn_stream(id, &[("streamType", kind)]).unwrap();
    }
    writer.data(3, b"hello ", false).unwrap();
    writer.data(3, b"world", true).unwrap();

    let (mut stdout, mut stderr, mut status) = (Vec::new(), Vec::new(), Vec::new());
    let mut replies = Vec::new();
    let mut ended = Vec::new();
    while !ended.contains(&1) {
        match reader
            .next_frame()
            .unwrap()
            .expect("the session ended early")
        {
            Frame::SynReply { stream_id } => replies.push(stream_id),
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                match stream_id {
                    5 => stdout.extend(data),
                    7 => stderr.extend(data),
                    1 => status.extend(data),
                    other => panic!("data on stream {other}"),
                }
                if fin {
                    ended.push(stream_id);
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    replies.sort();
    assert_eq!(replies, [1, 3, 5, 7]);
    assert_eq!(stdout, b"HELLO WORLD");
    assert_eq!(stderr, b"err");
    // The outputs ended before the status.
    assert_eq!(ended, [5, 7, 1]);
    let status: serde_json::Value = serde_json::from_slice(&status).unwrap();
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "3", "{status}");
}

#[test]
fn urls_are_one_time_and_other_protocols_and_garbage_are_refused() {
    let server = server();
    let url = server.url(exec_request()).unwrap();
    // Another protocol: refused, and the URL is spent.
    let (_, head) = upgrade(&url, "v1.channel.k8s.io");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (_, head) = upgrade(&url, "v4.channel.k8s.io");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    // A token never issued, or one for the other kind of session.
    let (_, head) = upgrade(&url.replace("/exec/", "/exec/0"), "v4.channel.k8s.io");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let url = server.url(exec_request()).unwrap();
    let (_, head) = upgrade(&url.replace("/exec/", "/attach/"), "v4.channel.k8s.io");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    // Garbage after the upgrade ends that session, and the server serves the next.
    let url = server.url(exec_request()).unwrap();
    let (mut conn, head) = upgrade(&url, "v4.channel.k8s.io");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    conn.write_all(&[0x80, 3, 0, 1, 0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .unwrap();
    drop(conn);
    let url = server.url(exec_request()).unwrap();
    let (_, head) = upgrade(&url, "v4.channel.k8s.io");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

/// A server that reads until its client half-closes, answers `echo:` and what it read, and
/// closes; the port it listens on.
fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                conn.read_to_end(&mut got).unwrap();
                conn.write_all(b"echo:").unwrap();
                conn.write_all(&got).unwrap();
            });
        }
    });
    port
}

fn forward_request(ports: Vec<u16>) -> Request {
    Request {
        kind: RequestKind::PortForward { ports },
        target_id: "p1".into(),
        tty: false,
        stdin: false,
        stdout: false,
        stderr: false,
    }
}

/// Reads frames until every stream in `streams` has ended; each stream's data.
fn read_until_ended(
    reader: &mut FrameReader<TcpStream>,
    streams: &[u32],
) -> BTreeMap<u32, Vec<u8>> {
    let mut data: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let mut ended = Vec::new();
    while !streams.iter().all(|s| ended.contains(s)) {
        match reader
            .next_frame()
            .unwrap()
            .expect("the session ended early")
        {
            Frame::SynReply { .. } => {}
            Frame::Data {
                stream_id,
                fin,
                data: bytes,
            } => {
                data.entry(stream_id).or_default().extend(bytes);
                if fin {
                    ended.push(stream_id);
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    data
}

#[test]
fn port_forwarding_carries_connections_both_ways_and_reports_failures() {
    let server = server();
    let port = echo_server();
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = server
        .url(forward_request(vec![port, closed_port]))
        .unwrap();
    assert!(url.contains("/portforward/"), "{url}");
    let (_, head) = upgrade(&url, "v4.channel.k8s.io");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    let url = server
        .url(forward_request(vec![port, closed_port]))
        .unwrap();
    let (conn, head) = upgrade(&url, "portforward.k8s.io");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("X-Stream-Protocol-Version: portforward.k8s.io"),
        "{head}"
    );
    let mut writer = FrameWriter::new(conn.try_clone().unwrap());
    let mut reader = FrameReader::new(conn.try_clone().unwrap());
    let port_text = port.to_string();
    // Two connections at once on one session; the second's data arrives first.
    for (id, kind, request) in [
        (1, "error", "0"),
        (3, "data", "0"),
        (5, "error", "1"),
        (7, "data", "1"),
    ] {
        let headers = [
            ("streamType", kind),
            ("port", port_text.as_str()),
            ("requestID", request),
        ];
        writer.syn_stream(id, &headers).unwrap();
    }
    writer.data(7, b"second", true).unwrap();
    writer.data(3, &vec![b'x'; 100_000], false).unwrap();
    writer.data(3, b"", true).unwrap();
    let data = read_until_ended(&mut reader, &[1, 3, 5, 7]);
    assert_eq!(data[&7], b"echo:second");
    assert_eq!(data[&3].len(), 100_005);
    assert!(data[&3].starts_with(b"echo:xxx"));
    assert!(data.get(&1).is_none_or(Vec::is_empty), "{data:?}");
    assert!(data.get(&5).is_none_or(Vec::is_empty), "{data:?}");

    // Nothing listens: the reason on the error stream, the data stream closed.
    let closed_text = closed_port.to_string();
    for (id, kind) in [(9, "error"), (11, "data")] {
        let headers = [
            ("streamType", kind),
            ("port", closed_text.as_str()),
            ("requestID", "2"),
        ];
        writer.syn_stream(id, &headers).unwrap();
    }
    let data = read_until_ended(&mut reader, &[9, 11]);
    let error = String::from_utf8_lossy(&data[&9]).into_owned();
    assert!(error.contains("p1") && error.contains("refused"), "{error}");
    // A port the URL was not issued for (and no requestID: paired by stream ids).
    for (id, kind) in [(13, "error"), (15, "data")] {
        writer
            .syn_stream(id, &[("streamType", kind), ("port", "1")])
            .unwrap();
    }
    let data = read_until_ended(&mut reader, &[13, 15]);
    let error = String::from_utf8_lossy(&data[&13]).into_owned();
    assert!(error.contains("port 1 was not among"), "{error}");
    // The session still serves, and ends with the connection.
    for (id, kind) in [(17, "error"), (19, "data")] {
        let headers = [
            ("streamType", kind),
            ("port", port_text.as_str()),
            ("requestID", "3"),
        ];
        writer.syn_stream(id, &headers).unwrap();
    }
    writer.data(19, b"third", true).unwrap();
    let data = read_until_ended(&mut reader, &[17, 19]);
    assert_eq!(data[&19], b"echo:third");
    conn.shutdown(Shutdown::Both).unwrap();
}
