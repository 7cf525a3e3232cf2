//! The two-host rig of the migration tests and the benchmark: a `MultiHost` with channel
//! identities, pools holding the test image, optionally a firewall that lets only the channel
//! in, channel servers and migrations run by helper processes inside the hosts.

use std::path::PathBuf;
use std::time::Duration;

use super::{Expect, Helper, Identity, MigrateResult, Role, SendResult, Target};
use crate::common::{self, console, last_tick, sha256_file, test_image, wait_for};
use tuchka_host::channel::DEFAULT_RUN_DIR;
use tuchka_host::{Accel, DirStorage, DomainSpec, DomainState, Hypervisor, Libvirt, Storage};
use tuchka_testkit::MultiHost;

/// The channel port of every simulated host.
pub const PORT: u16 = 7443;
/// Guest memory.
pub const GUEST_MIB: u64 = 256;
/// The guest prints `TICK <n>` on its console every second (user-data).
pub const TICKER: &str = "#!/bin/sh\n( i=0; while true; do i=$((i+1)); echo \"TICK $i\"; sleep 1; done ) </dev/null >/dev/console 2>&1 &\n";
/// The downtime limit the rig asks for (QEMU's default is 300 ms).
pub const DOWNTIME_LIMIT_MS: u64 = 250;
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(240);

/// Two simulated hosts with channel identities, pools holding the test image, a firewall that
/// only lets the channel in, and (once started) a channel server on each.
pub struct Rig {
    pub mh: MultiHost,
    pub cloud: String,
    pub ca: tuchka_pki::CaPem,
    pub ids: Vec<Identity>,
    pub image_sha: String,
    servers: Vec<Option<Helper>>,
    seq: u32,
    helper_args: &'static [&'static str],
}

impl Rig {
    /// Two hosts; `helper_args` select the helper in this executable ([`super::run_if_asked`]);
    /// `firewall`: only the channel port is reachable on the fabric.
    pub fn up(helper_args: &'static [&'static str], with_firewall: bool) -> Rig {
        common::require_root();
        common::require_libvirt();
        common::require_tool("qemu-img", "qemu-utils");
        common::require_tool("genisoimage", "genisoimage");
        common::require_tool("nft", "nftables");
        let image = test_image();
        let mh = MultiHost::up(2).expect("multihost up");
        let cloud = common::cloud_id();
        let ca = tuchka_pki::create_ca("tuchka CA", std::time::SystemTime::now()).expect("CA");
        let ids: Vec<Identity> = (1..=2)
            .map(|i| Identity::issue(&ca, &format!("0000000{i}-0000-4000-8000-00000000000{i}")))
            .collect();
        let image_sha = sha256_file(&image);
        for i in 0..2 {
            let st = DirStorage::open(&pool(&mh, i)).expect("pool");
            std::fs::copy(&image, st.image_partial_path(&image_sha)).expect("copy image");
            st.commit_image(&image_sha, &image_sha)
                .expect("commit image");
            if with_firewall {
                firewall(&mh, &host(i));
            }
        }
        Rig {
            mh,
            cloud,
            ca,
            ids,
            image_sha,
            servers: vec![None, None],
            seq: 0,
            helper_args,
        }
    }

    pub fn target(&self, i: usize) -> Target {
        Target {
            host_id: self.ids[i].host_id.clone(),
            addr: std::net::SocketAddr::new(
                self.mh.host(&host(i)).expect("host").fabric_ip.into(),
                PORT,
            ),
        }
    }

    pub fn role_file(&mut self, what: &str) -> PathBuf {
        self.seq += 1;
        self.mh.dir().join(format!("role-{}-{what}.json", self.seq))
    }

    /// Start the channel server of host `i` (as its agent would).
    pub fn serve(&mut self, i: usize) {
        let role = Role::Serve {
            identity: self.ids[i].clone(),
            listen: self.target(i).addr,
            run_dir: DEFAULT_RUN_DIR.into(),
            cloud_id: self.cloud.clone(),
        };
        let file = self.role_file("serve");
        let mut h = Helper::spawn(&self.mh, &host(i), &role, &file, self.helper_args);
        let addr = h.wait_for("READY", Duration::from_secs(30));
        assert_eq!(addr, self.target(i).addr.to_string());
        self.servers[i] = Some(h);
    }

    pub fn server(&mut self, i: usize) -> &mut Helper {
        self.servers[i].as_mut().expect("server started")
    }

    pub fn storage(&self, i: usize) -> DirStorage {
        DirStorage::open(&pool(&self.mh, i)).expect("pool")
    }

    pub fn libvirt(&self, i: usize) -> Libvirt {
        let uri = &self.mh.host(&host(i)).expect("host").libvirt_uri;
        Libvirt::connect(uri, &self.cloud).expect("libvirt of the host")
    }

    /// Define and boot VM `name` on host `i`; returns it once its console ticks.
    pub fn boot(&self, i: usize, name: &str) -> Vm {
        let vm = Vm {
            vm_id: format!("vm-{name}"),
            domain: format!("tk-{}-{name}", tuchka_host::cloud8(&self.cloud)),
            name: name.to_string(),
        };
        let st = self.storage(i);
        let root = st
            .ensure_root_disk(&vm.vm_id, &self.image_sha, 128)
            .expect("root disk");
        let seed = st
            .ensure_seed(&vm.vm_id, &vm.name, Some(TICKER), &[])
            .expect("seed");
        let hv = self.libvirt(i);
        hv.define(&DomainSpec {
            name: vm.domain.clone(),
            vm_id: vm.vm_id.clone(),
            cloud_id: self.cloud.clone(),
            accel: Accel::Tcg,
            vcpus: 1,
            max_vcpus: 1,
            volumes: vec![],
            memory_mib: GUEST_MIB,
            root_disk: root,
            seed_iso: seed,
            console_log: st.console_log_path(&vm.vm_id),
            nics: vec![],
        })
        .expect("define");
        hv.start(&vm.domain).expect("start");
        let log = st.console_log_path(&vm.vm_id);
        let ticking = wait_for(180, || (last_tick(&log) >= Some(2)).then_some(()));
        assert!(
            ticking.is_some(),
            "the guest did not boot and tick within 180 s; console:\n{}",
            console(&log)
        );
        vm
    }

    /// What the target agent does before a live migration: a fresh overlay over the same
    /// cached image with the same virtual size, and the VM's seed.
    pub fn prepare_target(&self, i: usize, vm: &Vm) {
        let st = self.storage(i);
        st.remove_vm(&vm.vm_id).expect("remove a stale vm dir");
        st.ensure_root_disk(&vm.vm_id, &self.image_sha, 128)
            .expect("target overlay");
        st.ensure_seed(&vm.vm_id, &vm.name, Some(TICKER), &[])
            .expect("target seed");
    }

    pub fn expect_live(&mut self, target: usize, source: usize, migration: &str, vm: &Vm) {
        let e = Expect {
            migration_id: migration.to_string(),
            source_host_id: self.ids[source].host_id.clone(),
            vm_id: vm.vm_id.clone(),
            live: true,
            disk_file: None,
        };
        self.server(target).expect(&e);
    }

    /// Migrate `vm` from host `from` to host `to` through the channel (run on `from`).
    pub fn migrate(
        &mut self,
        from: usize,
        to: usize,
        migration: &str,
        vm: &Vm,
        bandwidth_mib_s: Option<u64>,
        cut_at_bytes: Option<u64>,
    ) -> MigrateResult {
        let role = Role::Migrate {
            identity: self.ids[from].clone(),
            target: self.target(to),
            run_dir: DEFAULT_RUN_DIR.into(),
            cloud_id: self.cloud.clone(),
            migration_id: migration.to_string(),
            domain: vm.domain.clone(),
            from_pool: pool(&self.mh, from),
            to_pool: pool(&self.mh, to),
            bandwidth_mib_s,
            max_downtime_ms: Some(DOWNTIME_LIMIT_MS),
            cut_at_bytes,
        };
        let file = self.role_file("migrate");
        let mut h = Helper::spawn(&self.mh, &host(from), &role, &file, self.helper_args);
        let json = h.wait_for("RESULT", MIGRATION_TIMEOUT);
        h.finish();
        serde_json::from_str(&json).expect("migrate result")
    }

    /// Run a `send` helper on host `from`.
    pub fn send(&mut self, from: usize, role: Role) -> SendResult {
        let file = self.role_file("send");
        let mut h = Helper::spawn(&self.mh, &host(from), &role, &file, self.helper_args);
        let json = h.wait_for("RESULT", Duration::from_secs(60));
        h.finish();
        serde_json::from_str(&json).expect("send result")
    }

    pub fn state(&self, i: usize, vm: &Vm) -> Option<DomainState> {
        self.libvirt(i)
            .list()
            .expect("list")
            .into_iter()
            .find(|d| d.name == vm.domain)
            .map(|d| d.state)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for s in self.servers.iter_mut() {
            if let Some(h) = s.take() {
                h.finish();
            }
        }
    }
}

pub struct Vm {
    pub vm_id: String,
    pub domain: String,
    pub name: String,
}

pub fn host(i: usize) -> String {
    format!("h{}", i + 1)
}

pub fn pool(mh: &MultiHost, i: usize) -> PathBuf {
    mh.dir().join(host(i)).join("pool")
}

/// Inbound TCP on the fabric link: only the channel port (and replies to our own
/// connections). libvirtd's 16509 and qemu's 49152+ are unreachable from the other host.
pub fn firewall(mh: &MultiHost, h: &str) {
    let rules = format!(
        "table inet tkchan {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname \"eth0\" tcp dport {PORT} counter comment \"channel\"
    iifname \"eth0\" ct state established,related accept
    iifname \"eth0\" tcp dport {PORT} accept
    iifname \"eth0\" meta l4proto tcp counter drop comment \"everything else\"
  }}
}}
"
    );
    let file = mh.dir().join(format!("{h}-firewall.nft"));
    std::fs::write(&file, rules).expect("write the firewall");
    mh.run(h, &["nft".as_ref(), "-f".as_ref(), file.as_os_str()])
        .expect("load the firewall");
}

/// `(packets, bytes)` of the counter of the firewall rule containing `what`.
pub fn counter(mh: &MultiHost, h: &str, what: &str) -> (u64, u64) {
    let out = mh
        .run(h, &["nft", "list", "chain", "inet", "tkchan", "input"])
        .expect("list firewall");
    let Some(line) = out.lines().find(|l| l.contains(what)) else {
        return (0, 0);
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (num("packets"), num("bytes"))
}
