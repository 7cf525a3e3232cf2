//! What an operation does, as the controller records it: one tagged variant per kind, with
//! exactly the parameters needed to follow it to its end. Stored as JSON (`{"kind":
//! "group.create", "group": "web"}`); the public [`OperationKind`] is derived from it, so a kind
//! and its parameters can never disagree.

use serde::{Deserialize, Serialize};
use tuchka_api::{MigrationMode, OperationKind, PowerState};

/// An operation's kind and parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum OpKind {
    /// Create a group; succeeds when all its VMs run, rolls the whole group back otherwise.
    #[serde(rename = "group.create")]
    GroupCreate {
        /// Group name.
        group: String,
    },
    /// Scale a group; rolls back only what it added.
    #[serde(rename = "group.scale")]
    GroupScale {
        /// Group name.
        group: String,
        /// Ids of the VMs it added.
        #[serde(default)]
        added: Vec<String>,
        /// Ids of the VMs it removes.
        #[serde(default)]
        removed: Vec<String>,
        /// The group's count before.
        #[serde(default)]
        previous: u32,
    },
    /// Remove a group and its VMs.
    #[serde(rename = "group.delete")]
    GroupDelete {
        /// Group name.
        group: String,
    },
    /// Start (or resume) a VM.
    #[serde(rename = "vm.start")]
    VmStart {
        /// VM name.
        vm: String,
    },
    /// Shut a VM down.
    #[serde(rename = "vm.stop")]
    VmStop {
        /// VM name.
        vm: String,
    },
    /// Pause a VM.
    #[serde(rename = "vm.pause")]
    VmPause {
        /// VM name.
        vm: String,
    },
    /// Resume a paused VM.
    #[serde(rename = "vm.resume")]
    VmResume {
        /// VM name.
        vm: String,
    },
    /// Reboot a VM (ACPI).
    #[serde(rename = "vm.reboot")]
    VmReboot {
        /// VM name.
        vm: String,
        /// The reboot request to see carried out.
        seq: u64,
    },
    /// Remove one VM.
    #[serde(rename = "vm.delete")]
    VmDelete {
        /// VM name.
        vm: String,
        /// VM id.
        id: String,
    },
    /// Move a VM to another host; its progress is the migration row of the same id.
    #[serde(rename = "vm.migrate")]
    VmMigrate {
        /// VM name.
        vm: String,
        /// VM id.
        vm_id: String,
        /// Live or cold.
        mode: MigrationMode,
    },
    /// Create a network.
    #[serde(rename = "net.create")]
    NetCreate {
        /// Network name.
        network: String,
    },
    /// Remove a network.
    #[serde(rename = "net.delete")]
    NetDelete {
        /// Network name.
        network: String,
    },
    /// Move every VM off a host, a few at a time, one `vm.migrate` child per VM.
    #[serde(rename = "host.drain")]
    HostDrain {
        /// Host id.
        host_id: String,
        /// Host name.
        host: String,
        /// Most migrations at once per host.
        parallel: u32,
        /// VM ids still to start moving.
        #[serde(default)]
        waiting: Vec<String>,
        /// VMs that cannot move, with the reason.
        #[serde(default)]
        unmovable: Vec<(String, String)>,
    },
    /// Carry out a balance plan, one `vm.migrate` child per move.
    #[serde(rename = "balance.apply")]
    BalanceApply {
        /// The moves still to start: (vm id, target host id, reason).
        #[serde(default)]
        waiting: Vec<(String, String, String)>,
        /// Moves that could not start, with the reason.
        #[serde(default)]
        skipped: Vec<(String, String)>,
    },
    /// Capture a VM's root disk as a new image (the VM keeps running).
    #[serde(rename = "image.capture")]
    ImageCapture {
        /// Name of the new image.
        image: String,
        /// VM name.
        vm: String,
        /// VM id.
        vm_id: String,
        /// Host it is captured on.
        host_id: String,
    },
    /// Build an image: a builder VM runs a script and powers off; its disk becomes the image.
    #[serde(rename = "image.build")]
    ImageBuild {
        /// Name of the new image.
        image: String,
        /// The image it starts from.
        from: String,
        /// The builder's group (and its VM's name prefix) and network.
        builder: String,
        /// When the builder must have powered off, Unix seconds.
        deadline_unix: i64,
    },
    /// Change a VM's vCPUs, memory or root disk.
    #[serde(rename = "vm.resize")]
    VmResize {
        /// VM name.
        vm: String,
        /// VM id.
        vm_id: String,
        /// What must be seen running now: (vCPUs, memory MiB, disk MiB); None: left for later.
        #[serde(default)]
        now: (Option<u32>, Option<u64>, Option<u64>),
    },
    /// Hot-plug a volume into a VM.
    #[serde(rename = "volume.attach")]
    VolumeAttach {
        /// Volume name.
        volume: String,
        /// Volume id.
        volume_id: String,
        /// VM name.
        vm: String,
        /// VM id.
        vm_id: String,
    },
    /// Unplug a volume.
    #[serde(rename = "volume.detach")]
    VolumeDetach {
        /// Volume name.
        volume: String,
        /// Volume id.
        volume_id: String,
    },
    /// Grow a volume.
    #[serde(rename = "volume.resize")]
    VolumeResize {
        /// Volume name.
        volume: String,
        /// Volume id.
        volume_id: String,
        /// New size, MiB.
        size_mib: u64,
    },
}

impl OpKind {
    /// The public kind.
    pub fn kind(&self) -> OperationKind {
        match self {
            OpKind::GroupCreate { .. } => OperationKind::GroupCreate,
            OpKind::GroupScale { .. } => OperationKind::GroupScale,
            OpKind::GroupDelete { .. } => OperationKind::GroupDelete,
            OpKind::VmStart { .. } => OperationKind::VmStart,
            OpKind::VmStop { .. } => OperationKind::VmStop,
            OpKind::VmPause { .. } => OperationKind::VmPause,
            OpKind::VmResume { .. } => OperationKind::VmResume,
            OpKind::VmReboot { .. } => OperationKind::VmReboot,
            OpKind::VmDelete { .. } => OperationKind::VmDelete,
            OpKind::VmMigrate { .. } => OperationKind::VmMigrate,
            OpKind::NetCreate { .. } => OperationKind::NetCreate,
            OpKind::NetDelete { .. } => OperationKind::NetDelete,
            OpKind::HostDrain { .. } => OperationKind::HostDrain,
            OpKind::BalanceApply { .. } => OperationKind::BalanceApply,
            OpKind::ImageCapture { .. } => OperationKind::ImageCapture,
            OpKind::ImageBuild { .. } => OperationKind::ImageBuild,
            OpKind::VmResize { .. } => OperationKind::VmResize,
            OpKind::VolumeAttach { .. } => OperationKind::VolumeAttach,
            OpKind::VolumeDetach { .. } => OperationKind::VolumeDetach,
            OpKind::VolumeResize { .. } => OperationKind::VolumeResize,
        }
    }

    /// The power state a power operation waits for.
    pub fn wanted_power(&self) -> Option<PowerState> {
        match self {
            OpKind::VmStart { .. } | OpKind::VmResume { .. } => Some(PowerState::Running),
            OpKind::VmPause { .. } => Some(PowerState::Paused),
            OpKind::VmStop { .. } => Some(PowerState::Stopped),
            _ => None,
        }
    }
}

/// What the controller stores for an operation besides its public view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpRecord {
    /// Kind and parameters.
    #[serde(flatten)]
    pub kind: OpKind,
    /// Set when the operation failed and is rolling back: the error it will fail with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_error: Option<String>,
    /// The cause chain of `rollback_error`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollback_chain: Vec<String>,
}

impl OpRecord {
    /// A fresh record.
    pub fn new(kind: OpKind) -> Self {
        OpRecord {
            kind,
            rollback_error: None,
            rollback_chain: vec![],
        }
    }

    /// Decode a stored record. Records written before kinds were typed carry their kind only in
    /// the `kind` column: `kind` is put into the object when it lacks one.
    pub fn decode(kind: &str, mut params: serde_json::Value) -> serde_json::Result<Self> {
        if let Some(obj) = params.as_object_mut() {
            obj.entry("kind")
                .or_insert_with(|| serde_json::Value::String(kind.to_string()));
        }
        serde_json::from_value(params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_match_the_public_names() {
        let k = OpKind::GroupScale {
            group: "web".into(),
            added: vec!["a".into()],
            removed: vec![],
            previous: 2,
        };
        let text = serde_json::to_string(&OpRecord::new(k.clone())).expect("json");
        assert!(text.contains(r#""kind":"group.scale""#), "{text}");
        let back = OpRecord::decode("group.scale", serde_json::from_str(&text).expect("v"))
            .expect("decode");
        assert_eq!(back.kind, k);
        assert_eq!(back.kind.kind().as_str(), "group.scale");
    }

    #[test]
    fn records_written_before_typed_kinds_still_decode() {
        let old = serde_json::json!({"group": "web", "added": ["x"], "rollback_error": "boom"});
        let r = OpRecord::decode("group.create", old).expect("decode");
        assert_eq!(
            r.kind,
            OpKind::GroupCreate {
                group: "web".into()
            }
        );
        assert_eq!(r.rollback_error.as_deref(), Some("boom"));
        let old = serde_json::json!({"vm": "web-0", "want": "stopped"});
        let r = OpRecord::decode("vm.stop", old).expect("decode");
        assert_eq!(r.kind.wanted_power(), Some(PowerState::Stopped));
        assert!(OpRecord::decode("no.such", serde_json::json!({})).is_err());
    }
}
