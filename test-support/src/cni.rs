//! A CNI bridge network for tests: the standard plugins' conflist (bridge + host-local +
//! loopback) written to a conf dir, with what an earlier failed run left removed first.

use std::path::Path;
use std::process::Command;

/// Where Debian's containernetworking-plugins installs the plugins.
pub const CNI_BIN: &str = "/usr/lib/cni";

/// A bridge network `name` on Linux bridge `bridge`, addresses from `<prefix>.0/24` (gateway
/// `<prefix>.1`), optionally with the DNS block the bridge plugin hands to the runtime.
pub struct BridgeNetwork<'a> {
    pub name: &'a str,
    pub bridge: &'a str,
    pub prefix: &'a str,
    /// Name servers and search domains in the plugin's result.
    pub dns: Option<(&'a [&'a str], &'a [&'a str])>,
}

impl BridgeNetwork<'_> {
    /// Fails (never skips) when a plugin is missing; removes the bridge and the host-local
    /// leases of an earlier run; writes `<conf_dir>/10-test.conflist`.
    pub fn write(&self, conf_dir: &Path) {
        for plugin in ["bridge", "host-local", "loopback"] {
            assert!(
                Path::new(CNI_BIN).join(plugin).exists(),
                "{CNI_BIN}/{plugin} is missing (Debian package containernetworking-plugins)"
            );
        }
        let _ = Command::new("ip")
            .args(["link", "del", self.bridge])
            .output();
        let _ = std::fs::remove_dir_all(Path::new("/var/lib/cni/networks").join(self.name));
        let prefix = self.prefix;
        let mut bridge = serde_json::json!({
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": format!("{prefix}.0/24"), "gateway": format!("{prefix}.1")}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        });
        if let Some((nameservers, search)) = self.dns {
            bridge["dns"] = serde_json::json!({"nameservers": nameservers, "search": search});
        }
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [bridge, {"type": "loopback"}]
        });
        std::fs::create_dir_all(conf_dir).unwrap();
        std::fs::write(
            conf_dir.join("10-test.conflist"),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .unwrap();
    }
}
