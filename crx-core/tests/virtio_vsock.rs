//! virtio-vsock with real guests: the host side is this test process, speaking to the device's
//! Unix sockets (`CONNECT <port>` on the listener for host-initiated streams, `<uds>_<port>`
//! listeners for guest-initiated ones); the guest side is `/bin/crx-vsock` in the default initrd.
//! Payloads are a seeded xorshift64* stream both sides generate, checked byte for byte or by
//! sha256.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crx_core::{start_vm, VmConfig, VmExit, VmOutcome};
use crx_virtio::{DeviceConfig, VsockConfig};
use sha2::{Digest, Sha256};

mod common;
use common::{
    connect_to_guest, console_value, default_guest, expect_exit, Scratch, BOOT_TIMEOUT, HOST_WAIT,
};

const GUEST_CID: u32 = 3;
fn vsock_guest(scratch: &Scratch, vcpus: u8, script: &str) -> VmConfig {
    let mut config = default_guest();
    let initrd = config
        .initrd
        .clone()
        .expect("the default guest has an initrd");
    let archive = std::fs::read(&initrd).unwrap();
    assert!(
        archive.windows(13).any(|w| w == b"bin/crx-vsock"),
        "{} has no /bin/crx-vsock (run `cargo xtask guest`)",
        initrd.display()
    );
    config.vcpus = vcpus;
    config.mem_mib = 256;
    config.devices = vec![DeviceConfig::Vsock(VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: scratch.uds(),
    })];
    config.with_init_args(&["/bin/sh", "-c", script])
}

/// Boots `config`, runs `host` beside it, and returns the VM's outcome and `host`'s result.
fn run_with_host<T: Send + 'static>(
    test: &str,
    config: &VmConfig,
    timeout: Duration,
    host: impl FnOnce() -> T + Send + 'static,
) -> (VmOutcome, T) {
    let vmm = start_vm(config).unwrap_or_else(|e| panic!("{test}: cannot start the VM: {e}"));
    let host = std::thread::spawn(host);
    let outcome = vmm.wait_timeout(timeout);
    println!(
        "crx-vm-boot: {test}: {} vCPU, {} MiB: {} (guest init at {:?})",
        config.vcpus, config.mem_mib, outcome.exit, outcome.times.guest_init
    );
    let result = host.join();
    expect_exit(&outcome, VmExit::Exited(0));
    let result = result.unwrap_or_else(|p| {
        eprintln!("console tail:\n{}", outcome.console_tail);
        std::panic::resume_unwind(p)
    });
    (outcome, result)
}

/// The payload generator `crx-vsock` uses.
struct Payload(u64);

impl Payload {
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let value = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            word.copy_from_slice(&value[..word.len()]);
        }
    }

    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        Payload(seed).fill(&mut buf);
        buf
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends `len` bytes of `seed`'s payload to a guest echo server and checks the echo.
fn echo_round_trip(uds: &Path, port: u32, seed: u64, len: usize) -> u32 {
    let (stream, host_port) = connect_to_guest(uds, port);
    let mut writer = stream.try_clone().unwrap();
    let sent = Payload::bytes(seed, len);
    let expected = sent.clone();
    let sender = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::with_capacity(len);
    (&stream).read_to_end(&mut echoed).unwrap();
    sender.join().unwrap();
    assert_eq!(echoed.len(), len, "seed {seed}: echo length");
    assert!(echoed == expected, "seed {seed}: echoed bytes differ");
    host_port
}

fn accept_before(listener: &UnixListener, deadline: Instant) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(HOST_WAIT)).unwrap();
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the guest never connected");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// What the host received on one guest-initiated stream.
struct Received {
    seed: u64,
    announced: u64,
    bytes: u64,
    sha256: String,
    matches_payload: bool,
}

/// Reads one `crx-vsock send` stream: header, then payload until EOF, checked against the
/// generator when `check_bytes` (else only hashed); replies with the payload's sha256 if the
/// whole announced payload came.
fn receive_stream(mut stream: UnixStream, check_bytes: bool) -> Received {
    let mut header = [0u8; 16];
    stream.read_exact(&mut header).unwrap();
    let seed = u64::from_le_bytes(header[..8].try_into().unwrap());
    let announced = u64::from_le_bytes(header[8..].try_into().unwrap());
    let mut expected = Payload(seed);
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    // The expected stream, generated a block at a time (a multiple of the generator's 8 bytes).
    let mut want = vec![0u8; 256 * 1024];
    let mut want_at = want.len();
    let mut bytes = 0u64;
    let mut matches_payload = true;
    let mut last_report = Instant::now();
    loop {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        let mut got = &buf[..n];
        while check_bytes && !got.is_empty() {
            if want_at == want.len() {
                expected.fill(&mut want);
                want_at = 0;
            }
            let k = got.len().min(want.len() - want_at);
            matches_payload &= got[..k] == want[want_at..want_at + k];
            want_at += k;
            got = &got[k..];
        }
        bytes += n as u64;
        if last_report.elapsed() > Duration::from_secs(15) {
            println!("host: {} MiB received", bytes >> 20);
            last_report = Instant::now();
        }
    }
    let sha256 = hex(&sha.finalize());
    if bytes == announced {
        stream.write_all(sha256.as_bytes()).unwrap();
    }
    Received {
        seed,
        announced,
        bytes,
        sha256,
        matches_payload,
    }
}

#[test]
fn host_connects_to_a_guest_port_and_data_flows_both_ways() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let scratch = Scratch::new("vsock-host-to-guest");
    let config = vsock_guest(&scratch, 1, "crx-vsock echo-server 5000 1");
    let uds = scratch.uds();
    let (outcome, host_port) =
        run_with_host("vsock host to guest", &config, BOOT_TIMEOUT, move || {
            echo_round_trip(&uds, 5000, 42, 1 << 20)
        });
    assert!(host_port >= 1 << 30, "host port {host_port}");
    assert_eq!(console_value(&outcome, "echo-served"), Some("1"));
}

#[test]
fn guest_connects_to_a_host_socket_and_data_flows_both_ways() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let scratch = Scratch::new("vsock-guest-to-host");
    let listener = UnixListener::bind(scratch.host_port(6000)).unwrap();
    let config = vsock_guest(&scratch, 1, "crx-vsock send 6000 1048576 1");
    let (outcome, received) =
        run_with_host("vsock guest to host", &config, BOOT_TIMEOUT, move || {
            let stream = accept_before(&listener, Instant::now() + HOST_WAIT);
            receive_stream(stream, true)
        });
    assert_eq!((received.seed, received.announced), (1, 1 << 20));
    assert_eq!(received.bytes, 1 << 20);
    assert!(received.matches_payload, "the host got other bytes");
    assert_eq!(
        console_value(&outcome, "sent-sha256"),
        Some(received.sha256.as_str())
    );
    assert_eq!(console_value(&outcome, "reply"), Some("match"));
}

#[test]
fn a_hundred_concurrent_streams_each_way_carry_their_own_data() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    const STREAMS: u64 = 100;
    const BYTES: usize = 64 * 1024;
    let scratch = Scratch::new("vsock-hundred");
    let listener = UnixListener::bind(scratch.host_port(6000)).unwrap();
    let script = format!(
        "crx-vsock echo-server 5000 {STREAMS} & server=$!; \
         crx-vsock send-many 6000 {STREAMS} {BYTES} || exit 1; wait $server"
    );
    let config = vsock_guest(&scratch, 2, &script);
    let uds = scratch.uds();
    let started = Instant::now();
    let (outcome, (received, host_ports)) =
        run_with_host("vsock 100 streams", &config, BOOT_TIMEOUT * 3, move || {
            let deadline = Instant::now() + HOST_WAIT;
            let receivers: Vec<JoinHandle<Received>> = (0..STREAMS)
                .map(|_| {
                    let stream = accept_before(&listener, deadline);
                    std::thread::spawn(move || receive_stream(stream, true))
                })
                .collect();
            let connectors: Vec<JoinHandle<u32>> = (0..STREAMS)
                .map(|i| {
                    let uds = uds.clone();
                    std::thread::spawn(move || echo_round_trip(&uds, 5000, 1000 + i, BYTES))
                })
                .collect();
            let received: Vec<Received> =
                receivers.into_iter().map(|r| r.join().unwrap()).collect();
            let host_ports: Vec<u32> = connectors.into_iter().map(|c| c.join().unwrap()).collect();
            (received, host_ports)
        });
    println!("vsock 100 streams: {:?} from VM start", started.elapsed());
    let mut seeds: Vec<u64> = received.iter().map(|r| r.seed).collect();
    seeds.sort_unstable();
    assert_eq!(seeds, (1..=STREAMS).collect::<Vec<_>>());
    for r in &received {
        assert_eq!(r.bytes, BYTES as u64, "seed {}", r.seed);
        assert!(r.matches_payload, "seed {}: other bytes", r.seed);
    }
    let mut unique = host_ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), STREAMS as usize, "host ports are distinct");
    assert_eq!(
        console_value(&outcome, "send-many-ok"),
        Some(STREAMS.to_string().as_str())
    );
    assert_eq!(
        console_value(&outcome, "echo-served"),
        Some(STREAMS.to_string().as_str())
    );
}

#[test]
fn one_gib_from_the_guest_arrives_with_the_same_sha256() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    const BYTES: u64 = 1 << 30;
    let scratch = Scratch::new("vsock-gib");
    let listener = UnixListener::bind(scratch.host_port(6000)).unwrap();
    let config = vsock_guest(&scratch, 2, &format!("crx-vsock send 6000 {BYTES} 9"));
    let (outcome, (received, elapsed)) = run_with_host(
        "vsock 1 GiB",
        &config,
        Duration::from_secs(3600),
        move || {
            let stream = accept_before(&listener, Instant::now() + HOST_WAIT);
            let started = Instant::now();
            let received = receive_stream(stream, false);
            (received, started.elapsed())
        },
    );
    println!(
        "vsock 1 GiB guest to host: {elapsed:?} ({:.1} MiB/s; guest reports send-ms={:?})",
        received.bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64(),
        console_value(&outcome, "send-ms")
    );
    assert_eq!(received.bytes, BYTES);
    assert_eq!(
        console_value(&outcome, "sent-sha256"),
        Some(received.sha256.as_str())
    );
    assert_eq!(console_value(&outcome, "reply"), Some("match"));
}

#[test]
fn a_guest_closing_mid_stream_ends_the_host_stream_and_the_device_stays_usable() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let scratch = Scratch::new("vsock-midstream");
    let listener = UnixListener::bind(scratch.host_port(6000)).unwrap();
    let script = "crx-vsock send-partial 6000 1048576 300000 && crx-vsock send 6000 65536 1";
    let config = vsock_guest(&scratch, 1, script);
    let (outcome, (partial, full)) =
        run_with_host("vsock guest close", &config, BOOT_TIMEOUT, move || {
            let deadline = Instant::now() + HOST_WAIT;
            let partial = receive_stream(accept_before(&listener, deadline), true);
            let full = receive_stream(accept_before(&listener, deadline), true);
            (partial, full)
        });
    assert_eq!(partial.announced, 1 << 20);
    assert_eq!(
        partial.bytes, 300_000,
        "all sent before the close, then EOF"
    );
    assert!(partial.matches_payload);
    assert_eq!((full.bytes, full.matches_payload), (65536, true));
    assert_eq!(console_value(&outcome, "partial-sent"), Some("300000"));
    assert_eq!(console_value(&outcome, "reply"), Some("match"));
}

#[test]
fn a_guest_connecting_to_a_missing_or_dead_host_socket_fails_at_once() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let scratch = Scratch::new("vsock-missing");
    // A socket file nobody listens on any more.
    drop(UnixListener::bind(scratch.host_port(7778)).unwrap());
    let listener = UnixListener::bind(scratch.host_port(6000)).unwrap();
    let script = "crx-vsock connect-fails 7777 && crx-vsock connect-fails 7778 && \
                  crx-vsock send 6000 4096 1";
    let config = vsock_guest(&scratch, 1, script);
    let (outcome, after) =
        run_with_host("vsock no host socket", &config, BOOT_TIMEOUT, move || {
            receive_stream(accept_before(&listener, Instant::now() + HOST_WAIT), true)
        });
    let tail = &outcome.console_tail;
    let errors: Vec<&str> = tail
        .lines()
        .filter_map(|l| l.trim().strip_prefix("connect-error="))
        .collect();
    assert_eq!(errors, ["ECONNRESET", "ECONNRESET"], "{tail}");
    for ms in tail
        .lines()
        .filter_map(|l| l.trim().strip_prefix("connect-ms="))
    {
        let ms: u64 = ms.parse().unwrap();
        assert!(ms < 5000, "connect took {ms} ms to fail:\n{tail}");
    }
    assert_eq!((after.bytes, after.matches_payload), (4096, true));
}

#[test]
fn raw_throughput_each_way_on_256_mib_of_zeros() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    const BYTES: usize = 256 << 20;
    let scratch = Scratch::new("vsock-throughput");
    let listener = UnixListener::bind(scratch.host_port(6000)).unwrap();
    let script = format!("crx-vsock send-zeros 6000 {BYTES} && crx-vsock sink 5000");
    let config = vsock_guest(&scratch, 2, &script);
    let uds = scratch.uds();
    let (outcome, (from_guest, from_guest_zero, guest_to_host, host_to_guest)) = run_with_host(
        "vsock throughput",
        &config,
        Duration::from_secs(1800),
        move || {
            let mut stream = accept_before(&listener, Instant::now() + HOST_WAIT);
            let started = Instant::now();
            let zeros = vec![0u8; 256 * 1024];
            let mut buf = vec![0u8; zeros.len()];
            let (mut bytes, mut all_zero) = (0usize, true);
            loop {
                let n = stream.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                all_zero &= buf[..n] == zeros[..n];
                bytes += n;
            }
            drop(stream);
            let guest_to_host = started.elapsed();

            let (mut stream, _) = connect_to_guest(&uds, 5000);
            let started = Instant::now();
            for _ in 0..BYTES / zeros.len() {
                stream.write_all(&zeros).unwrap();
            }
            stream.shutdown(Shutdown::Write).unwrap();
            stream.read_to_end(&mut Vec::new()).unwrap();
            (bytes, all_zero, guest_to_host, started.elapsed())
        },
    );
    let rate = |d: Duration| (BYTES >> 20) as f64 / d.as_secs_f64();
    println!(
        "vsock raw throughput, 256 MiB: guest to host {guest_to_host:?} ({:.1} MiB/s), host to guest {host_to_guest:?} ({:.1} MiB/s)",
        rate(guest_to_host),
        rate(host_to_guest)
    );
    assert_eq!(from_guest, BYTES);
    assert!(from_guest_zero, "the host got nonzero bytes");
    assert_eq!(
        console_value(&outcome, "sink-bytes"),
        Some(BYTES.to_string().as_str())
    );
    assert_eq!(console_value(&outcome, "sink-zero"), Some("yes"));
}
