//! `Libvirt` survives a libvirtd restart. The system daemon is shared with other tests, so this
//! starts a private libvirtd + virtlogd in their own mount and network namespaces (directories
//! under /var/tmp bind-mounted over /run/libvirt etc., the recipe of
//! docs/notes multihost-facts), restarts that one, and removes everything afterwards.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{sh, wait_for, Scratch};
use tuchka_host::{Hypervisor, Libvirt};

/// A private libvirtd; killed (both daemons, by pid file) on drop.
struct PrivateLibvirtd {
    root: PathBuf,
}

impl PrivateLibvirtd {
    fn start(root: &Path) -> Self {
        for d in ["run", "lib", "log", "cache"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        let (ok, _) = sh(
            "cp",
            &["-a", "/etc/libvirt", &root.join("etc").to_string_lossy()],
        );
        assert!(ok, "copy /etc/libvirt");
        // Never start libvirt's default network.
        let nets = root.join("etc/qemu/networks");
        let _ = std::fs::remove_file(nets.join("default.xml"));
        let _ = std::fs::remove_dir_all(nets.join("autostart"));
        let script = "D=$1
mount --bind $D/run /run/libvirt; mount --bind $D/lib /var/lib/libvirt; mount --bind $D/etc /etc/libvirt
mount --bind $D/log /var/log/libvirt; mount --bind $D/cache /var/cache/libvirt
virtlogd -d -p /run/libvirt/virtlogd.pid
libvirtd -d -p /run/libvirt/libvirtd.pid";
        let root_s = root.to_string_lossy().into_owned();
        let (ok, _) = sh(
            "unshare",
            &[
                "-m",
                "-n",
                "--propagation",
                "private",
                "sh",
                "-ec",
                script,
                "sh",
                &root_s,
            ],
        );
        let me = PrivateLibvirtd {
            root: root.to_path_buf(),
        };
        assert!(ok, "start a private libvirtd");
        me.wait_up();
        me
    }

    fn uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}",
            self.root.join("run/libvirt-sock").display()
        )
    }

    fn pid(&self, daemon: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.root.join(format!("run/{daemon}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == daemon).then_some(pid)
    }

    fn wait_up(&self) {
        let up = wait_for(30, || {
            sh("virsh", &["-c", &self.uri(), "version"]).0.then_some(())
        });
        assert!(up.is_some(), "private libvirtd did not answer");
    }

    fn kill(&self, daemon: &str) {
        if let Some(pid) = self.pid(daemon) {
            let _ = sh("kill", &[&pid.to_string()]);
            let gone = wait_for(10, || {
                (!Path::new(&format!("/proc/{pid}/exe")).exists()).then_some(())
            });
            assert!(gone.is_some(), "{daemon} {pid} did not stop");
        }
    }

    /// Restart libvirtd inside the namespaces kept alive by virtlogd.
    fn restart_libvirtd(&self) {
        self.kill("libvirtd");
        let anchor = self.pid("virtlogd").expect("virtlogd keeps the namespaces");
        let (ok, _) = sh(
            "nsenter",
            &[
                "-t",
                &anchor.to_string(),
                "-m",
                "-n",
                "libvirtd",
                "-d",
                "-p",
                "/run/libvirt/libvirtd.pid",
            ],
        );
        assert!(ok, "restart libvirtd");
        self.wait_up();
    }
}

impl Drop for PrivateLibvirtd {
    fn drop(&mut self) {
        self.kill("libvirtd");
        self.kill("virtlogd");
    }
}

#[test]
fn survives_a_libvirtd_restart() {
    common::require_root();
    common::require_tool("libvirtd", "libvirt-daemon-system");
    common::require_tool("unshare", "util-linux");
    common::require_tool("nsenter", "util-linux");
    let scratch = Scratch::new();
    let daemon = PrivateLibvirtd::start(&scratch.dir.join("libvirt"));
    let hv = Libvirt::connect(&daemon.uri(), &common::cloud_id())
        .expect("connect to the private libvirtd");
    assert!(hv.list().expect("list before").is_empty());

    daemon.restart_libvirtd();
    std::thread::sleep(Duration::from_millis(200));
    assert!(hv
        .list()
        .expect("list after a restart reconnects transparently")
        .is_empty());
    assert!(hv.undefine("tkt-absent").is_ok(), "later calls work too");
}
