//! virtio-net with a real guest and a real tap: the test makes a network namespace
//! (`ip netns add`), opens a tap inside it and hands the VMM its fd (as a CNI plugin would).
//! The guest takes a static address; ping and an 8 MiB TCP transfer each way between the guest
//! and the namespace, checked by SHA-256. No traffic leaves the machine.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use crx_virtio::devices::tap::Tap;
use crx_virtio::{DeviceConfig, NetConfig, TapSource};
use sha2::{Digest, Sha256};

mod common;
use common::{console_value, default_guest, run_script, Netns};

const HOST_IP: &str = "10.200.0.1";
const GUEST_IP: &str = "10.200.0.2";
const TRANSFER: usize = 8 << 20;

fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn guest_and_namespace_ping_and_move_tcp_data_both_ways() {
    if !crx_testhost::vm_test_here!() {
        return;
    }
    let ns = Netns::create("net");
    let tap: OwnedFd = ns
        .run(|| Tap::open("crxtap0").expect("tap in the namespace").into())
        .join()
        .unwrap();
    assert!(ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{HOST_IP}/24"),
        "dev",
        "crxtap0"
    ]));
    assert!(ns.exec(&["ip", "link", "set", "crxtap0", "up"]));

    // Guest → namespace: a listener waits for the guest's upload.
    let listener = ns
        .run(|| TcpListener::bind((HOST_IP, 5000)).expect("listen in the namespace"))
        .join()
        .unwrap();
    let upload = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("the guest connects");
        let mut data = vec![0u8; TRANSFER];
        stream.read_exact(&mut data).expect("the guest's upload");
        hex(&Sha256::digest(&data))
    });
    // Namespace → guest: once the guest listens, send it a known pattern.
    let download_data = pattern(TRANSFER);
    let download_sum = hex(&Sha256::digest(&download_data));
    let ns_name = ns.0.clone();
    let download = ns.run(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut stream = loop {
            match TcpStream::connect((GUEST_IP, 5001)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("guest never listened: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        let pinged = Command::new("ip")
            .args([
                "netns", "exec", &ns_name, "busybox", "ping", "-c", "2", "-W", "5", GUEST_IP,
            ])
            .status()
            .is_ok_and(|s| s.success());
        stream.write_all(&download_data).expect("send to the guest");
        pinged
    });

    let mut config = default_guest();
    config.mem_mib = 256;
    let mac = [0x02, 0xc7, 0x00, 0x00, 0x00, 0x01];
    config.devices = vec![DeviceConfig::Net(NetConfig {
        tap: TapSource::Fd(tap.as_raw_fd()),
        mac,
    })];
    let script = format!(
        "ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 || exit 1; \
         echo mac=$(cat /sys/class/net/eth0/address); \
         ping -c 3 -W 5 {HOST_IP} >/dev/null && echo ping=ok; \
         dd if=/dev/urandom of=/tmp/out bs=1M count={mib} 2>/dev/null; \
         echo outsum=$(sha256sum /tmp/out | cut -d' ' -f1); \
         nc {HOST_IP} 5000 < /tmp/out; \
         nc -l -p 5001 > /tmp/in; \
         echo insize=$(wc -c < /tmp/in); \
         echo insum=$(sha256sum /tmp/in | cut -d' ' -f1)",
        mib = TRANSFER >> 20
    );
    let outcome = run_script("net", config, &script);
    drop(tap);

    assert_eq!(console_value(&outcome, "mac"), Some("02:c7:00:00:00:01"));
    assert_eq!(
        console_value(&outcome, "ping"),
        Some("ok"),
        "{}",
        outcome.console_tail
    );
    assert_eq!(
        console_value(&outcome, "outsum").map(str::to_string),
        Some(upload.join().expect("upload")),
        "guest → namespace data differs"
    );
    assert!(
        download.join().expect("download"),
        "namespace → guest ping failed"
    );
    assert_eq!(
        console_value(&outcome, "insize"),
        Some(TRANSFER.to_string().as_str())
    );
    assert_eq!(
        console_value(&outcome, "insum"),
        Some(download_sum.as_str())
    );
}
