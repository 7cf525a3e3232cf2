//! The migration protocol between the controller and two agents, on fakes: the real controller
//! (its SQLite file, operations engine, desired states) and the real agent reconcile passes,
//! with fake libvirt, storage, dataplane and mover — so every phase can be made to fail, and
//! each test runs in milliseconds. What moves the VMs for real is tested in `migration.rs`.
//!
//! Checked as a user would: `vm migrate` ends `succeeded` with the VM on the target, its
//! phases done and its downtime shown, nothing left on the source; a failure in any phase ends
//! `failed` with the host's reason, the VM running on the source as before and nothing left on
//! the target; a VM cannot be stopped or removed while it moves.

use std::collections::HashMap;
use std::sync::Arc;

use tuchka_agent::mover::{FakeMover, Mover};
use tuchka_agent::reconcile::{domain_spec, reconcile, HostParts, Memory};
use tuchka_api::agent::{HostFacts, HostRegister, MigrationStatus};
use tuchka_api::{
    GroupCreate, MigrationPhase, OperationState, PhaseState, VmMigrate, VmState, VmStop,
};
use tuchka_controller::{Controller, ControllerConfig};
use tuchka_host::fake::{FakeDataplane, FakeHypervisor, FakeStorage};
use tuchka_host::{Accel, Hypervisor, Storage};
use tuchka_store::ImageRow;

const IMG: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

struct FakeHost {
    id: String,
    name: String,
    hv: Arc<FakeHypervisor>,
    st: Arc<FakeStorage>,
    mover: Arc<FakeMover>,
    parts: HostParts,
    mem: Memory,
    up: bool,
    _dir: tempfile::TempDir,
}

struct Cloud {
    ctl: Controller,
    hosts: Vec<FakeHost>,
    /// CPU in use each host reports (0..1), by host name (default 0).
    load: HashMap<String, f64>,
    /// Cores each VM uses, by VM id (default 0).
    cores: HashMap<String, f64>,
    _dir: tempfile::TempDir,
}

fn facts(i: usize) -> HostFacts {
    HostFacts {
        cpus: 4,
        memory_mib: 8192,
        disk_mib: 100_000,
        disk_free_mib: 90_000,
        accel: "tcg".into(),
        address: format!("10.250.0.{}", 10 + i),
        channel_port: 7481,
        pool: format!("/pools/h{i}"),
        ..Default::default()
    }
}

fn cloud() -> Cloud {
    cloud_with(std::time::Duration::from_secs(15))
}

/// A cloud whose hosts are down after `down_after` without a report.
fn cloud_with(down_after: std::time::Duration) -> Cloud {
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = ControllerConfig::new(dir.path().to_path_buf());
    config.down_after = down_after;
    config.balance.mode = tuchka_api::BalanceMode::Auto;
    let ctl = Controller::open(config).expect("open");
    let mut hosts = vec![];
    for i in 1..=2 {
        let name = format!("h{i}");
        let reg = tuchka_controller::agents::register(
            &ctl,
            HostRegister {
                name: name.clone(),
                join_token: String::new(),
                facts: facts(i),
                identity: None,
                csr_pem: None,
            },
            true,
        )
        .expect("register");
        let hdir = tempfile::tempdir().expect("tmp");
        let hv = Arc::new(FakeHypervisor::new(ctl.cloud_id()));
        let st = Arc::new(FakeStorage::new(hdir.path()).expect("storage"));
        st.add_image(IMG, 64);
        let mover = Arc::new(FakeMover::default());
        let parts = HostParts {
            hypervisor: hv.clone(),
            storage: st.clone(),
            dataplane: Arc::new(FakeDataplane::new()),
            mover: mover.clone(),
            accel: Accel::Tcg,
            cloud_id: ctl.cloud_id().to_string(),
            channel_port: Some(7481),
            underlay_address: None,
            controller: None,
        };
        hosts.push(FakeHost {
            id: reg.host_id,
            name,
            hv,
            st,
            mover,
            parts,
            mem: Memory::default(),
            up: true,
            _dir: hdir,
        });
    }
    ctl.db()
        .atomic(|c| {
            tuchka_store::insert_image(
                c,
                &ImageRow {
                    name: "tiny".into(),
                    sha256: IMG.into(),
                    file_sha256: IMG.into(),
                    source_format: "qcow2".into(),
                    virtual_size: 64 << 20,
                    stored_size: 1 << 20,
                    created_at: tuchka_store::now(),
                    made_from: "upload".into(),
                },
            )
        })
        .expect("image");
    Cloud {
        ctl,
        hosts,
        load: HashMap::new(),
        cores: HashMap::new(),
        _dir: dir,
    }
}

impl Cloud {
    /// One pass of every agent that is up: desired → reconcile → report → engine.
    fn pass(&mut self) {
        for (i, h) in self.hosts.iter_mut().enumerate() {
            if !h.up {
                continue;
            }
            let d = tuchka_controller::desired::desired_for(&self.ctl, &h.id, 0).expect("desired");
            let r = reconcile(&h.parts, &d, &mut h.mem, &HashMap::new(), &self.cores);
            let mut report = r.report;
            report.facts = facts(i + 1);
            report.facts.cpu_usage = self.load.get(&h.name).copied().unwrap_or(0.0);
            tuchka_controller::agents::apply_report(&self.ctl, &h.id, report).expect("report");
            tuchka_controller::progress::progress(&self.ctl);
        }
    }

    fn host(&self, name: &str) -> &FakeHost {
        self.hosts.iter().find(|h| h.name == name).expect("host")
    }

    fn vm_host(&self, vm: &str) -> String {
        tuchka_controller::vms::get(&self.ctl, vm).expect("vm").host
    }

    fn op(&self, id: &str) -> tuchka_api::Operation {
        tuchka_controller::operations::get(&self.ctl, id).expect("op")
    }

    /// Launch web-0 and run it.
    fn launch(&mut self, stopped: bool) -> (String, String) {
        tuchka_controller::groups::create(
            &self.ctl,
            GroupCreate {
                name: "web".into(),
                image: "tiny".into(),
                count: 1,
                cpus: 1,
                memory_mib: 256,
                disk_mib: 1024,
                networks: vec![],
                user_data: None,
                ssh_keys: vec![],
                placement: None,
                anti_affinity: false,
                volume_size_mib: None,
                keep_volumes: false,
                max_cpus: None,
            },
        )
        .expect("group");
        for _ in 0..3 {
            self.pass();
        }
        if stopped {
            tuchka_controller::vms::action(
                &self.ctl,
                "web-0",
                tuchka_controller::vms::VmAction::Stop,
                VmStop {
                    force: true,
                    timeout_s: None,
                },
            )
            .expect("stop");
            for _ in 0..3 {
                self.pass();
            }
        }
        let vm = tuchka_controller::vms::get(&self.ctl, "web-0").expect("vm");
        assert_eq!(
            vm.state,
            if stopped {
                VmState::Stopped
            } else {
                VmState::Running
            }
        );
        let other = if vm.host == "h1" { "h2" } else { "h1" };
        (vm.host, other.to_string())
    }

    /// What libvirt does when a live copy finishes: the domain leaves the source for the target.
    fn libvirt_moves(&self, from: &str, to: &str, migration: &str) {
        let src = self.host(from);
        let dst = self.host(to);
        let job = src.mover.job(migration).expect("job begun");
        let spec = domain_spec(
            &dst.parts,
            &job.vm,
            dst.st.root_disk_path(&job.vm.id),
            dst.st.root_disk_path(&job.vm.id).with_file_name("seed.iso"),
            &HashMap::new(),
        );
        src.hv.undefine(&job.vm.domain).expect("source undefine");
        dst.hv.define(&spec).expect("target define");
        dst.hv.start(&job.vm.domain).expect("target start");
        src.mover.finish(migration, 120);
    }
}

fn migrate(c: &Cloud, to: &str) -> String {
    tuchka_controller::migrations::start(
        &c.ctl,
        "web-0",
        VmMigrate {
            to: Some(to.into()),
        },
    )
    .expect("migrate")
    .id
}

#[test]
fn a_live_migration_moves_the_vm_and_cleans_the_source() {
    let mut c = cloud();
    let (from, to) = c.launch(false);
    let id = migrate(&c, &to);
    c.pass();
    // The target prepared (disk, seed) without defining anything; the source was told to go.
    assert!(c.host(&to).st.vm(&vm_id(&c)).is_some());
    assert!(c.host(&to).hv.domain(&domain(&c)).is_none());
    c.pass();
    assert_eq!(c.host(&from).mover.calls(), vec![format!("begin {id}")]);
    let op = c.op(&id);
    assert_eq!(
        op.migration.as_ref().map(|m| m.phase),
        Some(MigrationPhase::Copying)
    );
    // A VM is in one migration at a time; it is not stopped or removed under the copy.
    let again = tuchka_controller::migrations::start(&c.ctl, "web-0", VmMigrate::default())
        .expect_err("second migration");
    assert!(again.to_string().contains("already migrating"), "{again}");
    let stop = tuchka_controller::vms::action(
        &c.ctl,
        "web-0",
        tuchka_controller::vms::VmAction::Stop,
        VmStop::default(),
    )
    .expect_err("stop while migrating");
    assert!(stop.to_string().contains("is migrating"), "{stop}");
    assert!(tuchka_controller::vms::delete(&c.ctl, "web-0").is_err());

    c.libvirt_moves(&from, &to, &id);
    for _ in 0..3 {
        c.pass();
    }
    let op = c.op(&id);
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    assert!(
        op.phases.iter().all(|p| p.state == PhaseState::Done),
        "{:?}",
        op.phases
    );
    let m = op.migration.expect("migration");
    assert_eq!(
        (m.from.as_str(), m.to.as_str()),
        (from.as_str(), to.as_str())
    );
    assert_eq!(m.downtime_ms, Some(120));
    assert_eq!(c.vm_host("web-0"), to);
    let vm = tuchka_controller::vms::get(&c.ctl, "web-0").expect("vm");
    assert_eq!(vm.state, VmState::Running);
    assert!(vm.migration.is_none());
    assert_eq!(
        vm.last_migration.map(|m| m.phase),
        Some(MigrationPhase::Done)
    );
    // Nothing of it is left on the source; the target runs it.
    assert!(c.host(&from).st.vm(&vm_id(&c)).is_none());
    assert!(c.host(&from).hv.domain(&domain(&c)).is_none());
    assert!(c.host(&to).hv.domain(&domain(&c)).is_some());
    // And it moves back.
    let back = migrate(&c, &from);
    c.pass();
    c.pass();
    c.libvirt_moves(&to, &from, &back);
    for _ in 0..3 {
        c.pass();
    }
    assert_eq!(c.op(&back).state, OperationState::Succeeded);
    assert_eq!(c.vm_host("web-0"), from);
}

fn vm_id(c: &Cloud) -> String {
    tuchka_controller::vms::get(&c.ctl, "web-0").expect("vm").id
}

fn domain(c: &Cloud) -> String {
    tuchka_controller::vms::get(&c.ctl, "web-0")
        .expect("vm")
        .domain
}

/// After a failed migration: the op failed with `reason`, the VM runs on `from` as before, and
/// the target has nothing of it.
fn assert_failed_cleanly(c: &mut Cloud, id: &str, from: &str, to: &str, reason: &str) {
    for _ in 0..4 {
        c.pass();
    }
    let op = c.op(id);
    assert_eq!(op.state, OperationState::Failed, "{op:?}");
    let e = op.error.expect("error");
    let text = format!("{} {}", e.message, e.chain.join(" "));
    assert!(text.contains(reason), "{text}");
    assert_eq!(c.vm_host("web-0"), from);
    let vm = tuchka_controller::vms::get(&c.ctl, "web-0").expect("vm");
    assert!(
        matches!(vm.state, VmState::Running | VmState::Stopped),
        "{vm:?}"
    );
    assert!(c.host(from).hv.domain(&domain(c)).is_some());
    assert!(
        c.host(to).st.vm(&vm_id(c)).is_none(),
        "nothing left on the target"
    );
    assert!(c.host(to).hv.domain(&domain(c)).is_none());
    assert_eq!(
        vm.last_migration.map(|m| m.phase),
        Some(MigrationPhase::Failed)
    );
}

#[test]
fn a_target_that_cannot_prepare_fails_the_migration_and_keeps_the_vm() {
    let mut c = cloud();
    let (from, to) = c.launch(false);
    c.host(&to).st.fail("ensure_root_disk");
    let id = migrate(&c, &to);
    assert_failed_cleanly(&mut c, &id, &from, &to, "could not prepare");
    assert!(
        c.host(&from).mover.calls().is_empty(),
        "the copy never started"
    );
}

#[test]
fn a_copy_that_fails_is_aborted_and_the_target_cleaned() {
    let mut c = cloud();
    let (from, to) = c.launch(false);
    let id = migrate(&c, &to);
    c.pass();
    c.pass();
    c.host(&from)
        .mover
        .fail(&id, "libvirt: connection reset by peer");
    assert_failed_cleanly(&mut c, &id, &from, &to, "connection reset by peer");
}

#[test]
fn an_abort_cuts_a_running_copy_before_the_target_is_cleaned() {
    let mut c = cloud_with(std::time::Duration::from_secs(1));
    let (from, to) = c.launch(false);
    let id = migrate(&c, &to);
    c.pass();
    c.pass();
    // The target's agent dies mid-copy: the host goes silent; the controller aborts.
    c.hosts.iter_mut().find(|h| h.name == to).expect("to").up = false;
    std::thread::sleep(std::time::Duration::from_millis(2100));
    for _ in 0..3 {
        c.pass();
    }
    assert!(
        c.host(&from).mover.calls().contains(&format!("abort {id}")),
        "{:?}",
        c.host(&from).mover.calls()
    );
    assert_eq!(
        c.host(&from).mover.status(&id).map(|m| m.status),
        None,
        "forgotten once aborted"
    );
    // The target comes back; it removes what it prepared.
    c.hosts.iter_mut().find(|h| h.name == to).expect("to").up = true;
    assert_failed_cleanly(&mut c, &id, &from, &to, "target host stopped reporting");
}

#[test]
fn a_vm_being_captured_does_not_move_until_the_capture_is_over() {
    let mut c = cloud();
    let (from, to) = c.launch(false);
    let cap = tuchka_controller::captures::start(
        &c.ctl,
        tuchka_api::ImageCapture {
            name: "snap".into(),
            vm: "web-0".into(),
        },
    )
    .expect("capture");
    let err = tuchka_controller::migrations::start(
        &c.ctl,
        "web-0",
        VmMigrate {
            to: Some(to.clone()),
        },
    )
    .expect_err("being captured")
    .to_string();
    assert!(
        err.contains("is being captured as image \"snap\"") && err.contains(&cap.id),
        "{err}"
    );
    c.pass();
    let vm = tuchka_controller::vms::get(&c.ctl, "web-0").expect("vm");
    assert_eq!(vm.host, from, "it stayed where it was");
}

#[test]
fn a_stopped_vm_moves_cold_and_stays_stopped() {
    let mut c = cloud();
    let (from, to) = c.launch(true);
    let id = migrate(&c, &to);
    let op = c.op(&id);
    assert_eq!(
        op.migration.as_ref().map(|m| m.mode),
        Some(tuchka_api::MigrationMode::Cold)
    );
    c.pass();
    c.pass();
    assert_eq!(
        c.host(&from).mover.status(&id).map(|m| m.status),
        Some(MigrationStatus::Running)
    );
    // The disk arrived and was verified (the fake mover says so); the target defines it stopped.
    c.host(&from).mover.finish(&id, 0);
    for _ in 0..4 {
        c.pass();
    }
    let op = c.op(&id);
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    let vm = tuchka_controller::vms::get(&c.ctl, "web-0").expect("vm");
    assert_eq!(
        (vm.host.as_str(), vm.state),
        (to.as_str(), VmState::Stopped)
    );
    assert!(c.host(&to).hv.domain(&domain(&c)).is_some());
    assert!(c.host(&from).hv.domain(&domain(&c)).is_none());
    assert!(c.host(&from).st.vm(&vm_id(&c)).is_none());
}

/// Whether host `host` has the file of volume `id`.
fn has_volume(c: &Cloud, host: &str, id: &str) -> bool {
    c.host(host)
        .st
        .volumes()
        .expect("files")
        .iter()
        .any(|f| f.0 == id)
}

/// Every running child migration of `op` whose copy runs: libvirt finishes it.
fn finish_children(c: &Cloud, op: &str) {
    for child in c.op(op).children {
        let Some(m) = c.op(&child).migration else {
            continue;
        };
        let src = c.host(&m.from);
        if src.mover.status(&child).map(|s| s.status) == Some(MigrationStatus::Running) {
            c.libvirt_moves(&m.from, &m.to, &child);
        }
    }
}

#[test]
fn the_automatic_balancer_holds_then_moves_then_leaves_the_vms_alone() {
    let mut c = cloud();
    tuchka_controller::groups::create(
        &c.ctl,
        GroupCreate {
            name: "burn".into(),
            image: "tiny".into(),
            count: 4,
            cpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
            networks: vec![],
            user_data: None,
            ssh_keys: vec![],
            placement: Some(tuchka_api::PlacementPolicy::Pack),
            anti_affinity: false,
            volume_size_mib: None,
            keep_volumes: false,
            max_cpus: None,
        },
    )
    .expect("group");
    for _ in 0..3 {
        c.pass();
    }
    let packed = c.vm_host("burn-0");
    for i in 0..4 {
        assert_eq!(c.vm_host(&format!("burn-{i}")), packed, "packed");
        let id = tuchka_controller::vms::get(&c.ctl, &format!("burn-{i}"))
            .expect("vm")
            .id;
        c.cores.insert(id, 0.9);
    }
    c.load.insert(packed.clone(), 0.9);
    c.pass();
    let round = |c: &Cloud| {
        tuchka_controller::balance::auto_round(&c.ctl).expect("round");
        tuchka_controller::balance::status(&c.ctl).expect("status")
    };
    // Above the threshold, but held for 3 rounds: nothing moves in the first two.
    for n in 1..=2 {
        let s = round(&c);
        assert!(s.imbalance > s.threshold, "{s:?}");
        assert_eq!(s.rounds_above, n, "{s:?}");
        assert!(s.decisions[0].operation.is_none(), "{:?}", s.decisions[0]);
        assert!(
            s.decisions[0].summary.contains("nothing moved"),
            "{:?}",
            s.decisions[0]
        );
    }
    let s = round(&c);
    let d = &s.decisions[0];
    assert!(d.operation.is_some(), "the third round moves: {d:?}");
    // From then on: each apply is carried out, the loads follow the VMs, and the rounds go on
    // until the cloud is even; no VM ever goes back to the host it left.
    let hosts_of =
        |c: &Cloud| -> Vec<String> { (0..4).map(|i| c.vm_host(&format!("burn-{i}"))).collect() };
    let mut left: HashMap<String, String> = HashMap::new();
    let mut quiet = 0;
    let mut decision = d.clone();
    for _ in 0..20 {
        if let Some(op) = &decision.operation {
            quiet = 0;
            let before = hosts_of(&c);
            assert!(
                decision
                    .moves
                    .iter()
                    .all(|m| !m.reason.is_empty() && m.imbalance_after < m.imbalance_before),
                "{decision:?}"
            );
            for _ in 0..6 {
                c.pass();
                finish_children(&c, op);
            }
            c.pass();
            let o = c.op(op);
            assert_eq!(o.state, OperationState::Succeeded, "{o:?}");
            assert_eq!(o.children.len(), decision.moves.len());
            let after = hosts_of(&c);
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                if b != a {
                    let vm = format!("burn-{i}");
                    assert_ne!(left.get(&vm), Some(a), "{vm} went back to {a}: ping-pong");
                    left.insert(vm, b.clone());
                }
            }
            c.load.clear();
            for h in &after {
                *c.load.entry(h.clone()).or_default() += 0.9 / 4.0;
            }
            c.pass();
        } else {
            quiet += 1;
            if quiet == 4 {
                break;
            }
        }
        let s = round(&c);
        decision = s.decisions[0].clone();
    }
    assert_eq!(quiet, 4, "the balancer came to rest: {decision:?}");
    let used: std::collections::HashSet<String> = hosts_of(&c).into_iter().collect();
    assert_eq!(used.len(), 2, "the load is spread: {used:?}");
    let s = tuchka_controller::balance::status(&c.ctl).expect("status");
    assert!(s.imbalance <= s.threshold, "{s:?}");
}

#[test]
fn a_volume_lives_on_one_host_and_moves_with_its_vm_cold_and_live() {
    let mut c = cloud();
    let (here, other) = c.launch(false);
    let vol = |name: &str, host: Option<&str>, near: Option<&str>| {
        tuchka_controller::volumes::create(
            &c.ctl,
            tuchka_api::VolumeCreate {
                name: name.into(),
                size_mib: 64,
                near: near.map(str::to_string),
                host: host.map(str::to_string),
            },
        )
    };
    let far = vol("far", Some(&other), None).expect("volume on the other host");
    assert_eq!(far.host, other);
    let attach = |name: &str| {
        tuchka_controller::volumes::attach(
            &c.ctl,
            name,
            tuchka_api::VolumeAttach { vm: "web-0".into() },
        )
    };
    let err = attach("far").expect_err("another host").to_string();
    assert!(
        err.contains(&format!(
            "lives on host {other} and vm \"web-0\" runs on host {here}"
        )) && err.contains(&format!("tuchka vm migrate web-0 --to {other}")),
        "{err}"
    );
    let near = vol("near", None, Some("web-0")).expect("volume near web-0");
    assert_eq!(near.host, here);
    let op = attach("near").expect("attach").id;
    for _ in 0..3 {
        c.pass();
    }
    assert_eq!(
        c.op(&op).state,
        OperationState::Succeeded,
        "{:?}",
        c.op(&op)
    );
    let v = tuchka_controller::volumes::get(&c.ctl, "near").expect("near");
    assert_eq!(
        (v.state, v.vm.as_deref()),
        (tuchka_api::VolumeState::Attached, Some("web-0"))
    );
    let h = c.host(&here);
    let domain = domain(&c);
    assert_eq!(
        h.hv.volumes(&domain).expect("volumes").len(),
        1,
        "plugged in"
    );

    // Stopped, it moves cold with its volume: the target admits the root disk and the volume
    // as two files, and once they arrived the volume lives there, still attached.
    tuchka_controller::vms::action(
        &c.ctl,
        "web-0",
        tuchka_controller::vms::VmAction::Stop,
        VmStop {
            force: true,
            timeout_s: None,
        },
    )
    .expect("stop");
    for _ in 0..3 {
        c.pass();
    }
    let id = migrate(&c, &other);
    assert_eq!(
        c.op(&id).migration.as_ref().map(|m| m.mode),
        Some(tuchka_api::MigrationMode::Cold)
    );
    c.pass();
    let files: Vec<String> = c
        .host(&other)
        .mover
        .incoming()
        .iter()
        .flat_map(|j| j.files.iter().map(|f| f.0.clone()))
        .collect();
    assert_eq!(
        files,
        vec![vm_id(&c), v.id.clone()],
        "root disk, then the volume"
    );
    c.pass();
    c.host(&here).mover.finish(&id, 0);
    for _ in 0..4 {
        c.pass();
    }
    assert_eq!(
        c.op(&id).state,
        OperationState::Succeeded,
        "{:?}",
        c.op(&id)
    );
    let v = tuchka_controller::volumes::get(&c.ctl, "near").expect("near");
    assert_eq!(
        (v.host.as_str(), v.state, v.vm.as_deref()),
        (
            other.as_str(),
            tuchka_api::VolumeState::Attached,
            Some("web-0")
        )
    );
    assert_eq!(
        c.host(&other).hv.volumes(&domain).expect("volumes").len(),
        1,
        "defined on the target with its volume"
    );
    assert!(
        !has_volume(&c, &here, &v.id),
        "the source's copy is removed"
    );
    // From here on the VM lives on the other host.
    let (here, other) = (other, here);
    tuchka_controller::vms::action(
        &c.ctl,
        "web-0",
        tuchka_controller::vms::VmAction::Start,
        VmStop::default(),
    )
    .expect("start");
    for _ in 0..3 {
        c.pass();
    }
    let rm = tuchka_controller::volumes::delete(&c.ctl, "near")
        .expect_err("attached")
        .to_string();
    assert!(rm.contains("detach it first"), "{rm}");

    // Running, it moves live (back) and its volume goes with it: made empty on the target,
    // copied by libvirt with the root disk, then the source's copy removed.
    let id = migrate(&c, &other);
    c.pass();
    let vid = v.id.clone();
    assert!(
        has_volume(&c, &other, &vid),
        "the target made the volume before the copy"
    );
    c.pass();
    c.libvirt_moves(&here, &other, &id);
    for _ in 0..4 {
        c.pass();
    }
    assert_eq!(
        c.op(&id).state,
        OperationState::Succeeded,
        "{:?}",
        c.op(&id)
    );
    let v = tuchka_controller::volumes::get(&c.ctl, "near").expect("near");
    assert_eq!(
        (v.host.as_str(), v.state, v.vm.as_deref()),
        (
            other.as_str(),
            tuchka_api::VolumeState::Attached,
            Some("web-0")
        )
    );
    assert_eq!(
        c.host(&other).hv.volumes(&domain).expect("volumes").len(),
        1
    );
    assert!(
        !has_volume(&c, &here, &v.id),
        "the source's copy is removed"
    );

    let op = tuchka_controller::volumes::detach(&c.ctl, "near")
        .expect("detach")
        .id;
    for _ in 0..3 {
        c.pass();
    }
    assert_eq!(c.op(&op).state, OperationState::Succeeded);
    assert!(c
        .host(&other)
        .hv
        .volumes(&domain)
        .expect("volumes")
        .is_empty());
    tuchka_controller::volumes::delete(&c.ctl, "near").expect("rm");
    tuchka_controller::volumes::delete(&c.ctl, "far").expect("rm");
    for _ in 0..3 {
        c.pass();
    }
    assert!(tuchka_controller::volumes::list(&c.ctl)
        .expect("list")
        .is_empty());
    assert!(c.host(&here).st.volumes().expect("files").is_empty());
    assert!(c.host(&other).st.volumes().expect("files").is_empty());
}

#[test]
fn removing_a_dead_source_mid_migration_fails_it_and_the_target_drops_its_copy() {
    let mut c = cloud_with(std::time::Duration::from_secs(1));
    let (from, to) = c.launch(false);
    // A host that is up with VMs is not removed, forced or not.
    let e = tuchka_controller::hosts::remove(&c.ctl, &from, true).expect_err("up");
    assert_eq!(e.code(), "HostInUse", "{e}");
    assert!(e.to_string().contains("tuchka host drain"), "{e}");
    let id = migrate(&c, &to);
    c.pass();
    c.pass();
    let vm = vm_id(&c);
    assert!(c.host(&to).st.vm(&vm).is_some(), "the target prepared");
    // The source dies for good mid-copy.
    c.hosts
        .iter_mut()
        .find(|h| h.name == from)
        .expect("from")
        .up = false;
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let e = tuchka_controller::hosts::remove(&c.ctl, &from, false).expect_err("not forced");
    assert_eq!(e.code(), "HostHasVms", "{e}");
    let removed = tuchka_controller::hosts::remove(&c.ctl, &from, true).expect("forced");
    assert_eq!(removed.lost_vms, ["web-0"]);
    for _ in 0..3 {
        c.pass();
    }
    let op = c.op(&id);
    assert_eq!(op.state, OperationState::Failed, "{op:?}");
    let e = op.error.expect("error");
    assert!(
        format!("{} {}", e.message, e.chain.join(" ")).contains("was removed"),
        "{e:?}"
    );
    let v = tuchka_controller::vms::get(&c.ctl, "web-0").expect("vm");
    assert_eq!((v.state, v.host.as_str()), (VmState::Lost, from.as_str()));
    assert!(
        c.host(&to).st.vm(&vm).is_none(),
        "the target dropped its copy"
    );
    assert!(c.host(&to).hv.domain(&domain(&c)).is_none());
    // The lost VM goes at once when asked; its group with it.
    tuchka_controller::groups::delete(&c.ctl, "web").expect("group rm");
    tuchka_controller::progress::progress(&c.ctl);
    assert!(tuchka_controller::vms::get(&c.ctl, "web-0").is_err());
    assert!(tuchka_controller::groups::get(&c.ctl, "web").is_err());
}
