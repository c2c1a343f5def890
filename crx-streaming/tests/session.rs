//! The streaming server end to end on loopback, with a client written from the crate's own
//! framing (crictl and critest, client-go's executor, drive it in crx-cri's tests): the
//! upgrade, a whole exec session, and what it refuses.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use crx_streaming::spdy::{Frame, FrameReader, FrameWriter};
use crx_streaming::{Handler, Request, RequestKind, StreamingServer, Streams};

/// Upper-cases stdin onto stdout, says "err" on stderr, exits 3.
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
}

fn server() -> Arc<StreamingServer> {
    StreamingServer::start("127.0.0.1:0".parse().unwrap(), Arc::new(Shout)).unwrap()
}

fn exec_request() -> Request {
    Request {
        kind: RequestKind::Exec {
            cmd: vec!["shout".into()],
        },
        container_id: "c1".into(),
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
