//! libvirt domain XML, rendered from typed structs.
//!
//! Every value goes through [`xml_escape`]; nothing is concatenated unescaped. The domain
//! carries `<metadata><tuchka:vm cloud=… id=…/></metadata>` ([`METADATA_NS`]) so that a host
//! shared by several clouds can tell its own domains apart ([`parse_vm_metadata`]).

use std::fmt::Write as _;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::accel::Accel;

/// XML namespace of the tuchka metadata element.
pub const METADATA_NS: &str = "https://tuchka.dev/xmlns/vm/1";

/// Everything needed to define one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// libvirt domain name (`tk-<cloud8>-<vm name>`).
    pub name: String,
    /// VM id; also the domain UUID when it is one (else a UUID is derived from it).
    pub vm_id: String,
    /// Cloud id written into the metadata.
    pub cloud_id: String,
    /// Accelerator (domain type).
    pub accel: Accel,
    /// vCPUs.
    pub vcpus: u32,
    /// Most vCPUs it may be given while it runs (hot-plug up to this; at least `vcpus`).
    pub max_vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// qcow2 root disk (virtio).
    pub root_disk: PathBuf,
    /// NoCloud seed ISO (IDE cdrom).
    pub seed_iso: PathBuf,
    /// File that receives the serial console (appended).
    pub console_log: PathBuf,
    /// NICs in guest order.
    pub nics: Vec<NicSpec>,
    /// Data volumes, after the root disk (`vdb`, `vdc`, …).
    pub volumes: Vec<VolumeSpec>,
}

/// One data volume: a qcow2 file attached as a virtio disk whose serial is the volume id (the
/// guest sees `/dev/disk/by-id/virtio-<serial>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Volume id (the serial; virtio keeps its first 20 characters).
    pub id: String,
    /// The qcow2 file.
    pub path: PathBuf,
    /// Guest device (`vdb`…).
    pub target: String,
}

/// The serial a volume's disk carries: its id without dashes, cut to the 20 characters virtio
/// passes to the guest.
pub fn volume_serial(id: &str) -> String {
    id.chars().filter(|c| *c != '-').take(20).collect()
}

/// The `<disk>` element of a data volume (for the domain and for hot-plug).
pub fn render_volume_xml(v: &VolumeSpec) -> String {
    let mut x = String::new();
    let _ = writeln!(x, "    <disk type='file' device='disk'>");
    let _ = writeln!(
        x,
        "      <driver name='qemu' type='qcow2' error_policy='enospace'/>"
    );
    let _ = writeln!(
        x,
        "      <source file='{}'/>",
        xml_escape(&v.path.to_string_lossy())
    );
    let _ = writeln!(
        x,
        "      <target dev='{}' bus='virtio'/>",
        xml_escape(&v.target)
    );
    let _ = writeln!(
        x,
        "      <serial>{}</serial>",
        xml_escape(&volume_serial(&v.id))
    );
    let _ = writeln!(x, "    </disk>");
    x
}

/// The guest device of the `n`-th data volume (0: `vdb`), up to `vdz`.
pub fn volume_target(n: usize) -> Option<String> {
    (n < 24).then(|| format!("vd{}", (b'b' + n as u8) as char))
}

/// One virtio NIC plugged into a bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// Bridge the tap is enslaved to.
    pub bridge: String,
    /// Guest MAC address.
    pub mac: String,
    /// Host tap device name (≤ 15 chars), created by libvirt.
    pub tap: String,
    /// MTU of the NIC.
    pub mtu: u32,
}

/// Escape `&`, `<`, `>`, `'` and `"`; characters that XML 1.0 cannot carry at all (most control
/// characters) become U+FFFD, so the output is always well-formed.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// The domain UUID: `vm_id` itself when it is a UUID, else one derived from
/// sha256(cloud_id, vm_id) so that redefining the same VM keeps the same UUID.
pub fn domain_uuid(cloud_id: &str, vm_id: &str) -> String {
    if is_uuid(vm_id) {
        return vm_id.to_ascii_lowercase();
    }
    let digest = Sha256::new()
        .chain_update(b"tuchka-domain-uuid\0")
        .chain_update(cloud_id.as_bytes())
        .chain_update(b"\0")
        .chain_update(vm_id.as_bytes())
        .finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x50; // version 5-style (name-based)
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Render the domain XML for `spec` (pure). See the crate docs for the device model.
pub fn render_domain_xml(spec: &DomainSpec) -> String {
    let e = xml_escape;
    let path = |p: &PathBuf| xml_escape(&p.to_string_lossy());
    let mut x = String::new();
    // `write!` into a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(x, "<domain type='{}'>", spec.accel.domain_type());
    let _ = writeln!(x, "  <name>{}</name>", e(&spec.name));
    let _ = writeln!(
        x,
        "  <uuid>{}</uuid>",
        domain_uuid(&spec.cloud_id, &spec.vm_id)
    );
    let _ = writeln!(x, "  <metadata>");
    let _ = writeln!(
        x,
        "    <tuchka:vm xmlns:tuchka='{}' cloud='{}' id='{}'/>",
        METADATA_NS,
        e(&spec.cloud_id),
        e(&spec.vm_id)
    );
    let _ = writeln!(x, "  </metadata>");
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", spec.memory_mib);
    let _ = writeln!(
        x,
        "  <currentMemory unit='MiB'>{}</currentMemory>",
        spec.memory_mib
    );
    let max = spec.max_vcpus.max(spec.vcpus);
    if max > spec.vcpus {
        let _ = writeln!(
            x,
            "  <vcpu placement='static' current='{}'>{max}</vcpu>",
            spec.vcpus
        );
    } else {
        let _ = writeln!(x, "  <vcpu placement='static'>{}</vcpu>", spec.vcpus);
    }
    let _ = writeln!(x, "  <os>");
    let _ = writeln!(x, "    <type arch='x86_64' machine='pc'>hvm</type>");
    let _ = writeln!(x, "    <boot dev='hd'/>");
    let _ = writeln!(x, "  </os>");
    let _ = writeln!(x, "  <features>");
    let _ = writeln!(x, "    <acpi/>");
    let _ = writeln!(x, "    <apic/>");
    let _ = writeln!(x, "  </features>");
    let _ = writeln!(x, "  <clock offset='utc'/>");
    let _ = writeln!(x, "  <on_poweroff>destroy</on_poweroff>");
    let _ = writeln!(x, "  <on_reboot>restart</on_reboot>");
    let _ = writeln!(x, "  <on_crash>destroy</on_crash>");
    let _ = writeln!(x, "  <devices>");
    let _ = writeln!(x, "    <disk type='file' device='disk'>");
    // A write that finds the pool full pauses the guest (libvirt says why) instead of failing.
    let _ = writeln!(
        x,
        "      <driver name='qemu' type='qcow2' error_policy='enospace'/>"
    );
    let _ = writeln!(x, "      <source file='{}'/>", path(&spec.root_disk));
    let _ = writeln!(x, "      <target dev='vda' bus='virtio'/>");
    let _ = writeln!(x, "    </disk>");
    for v in &spec.volumes {
        x.push_str(&render_volume_xml(v));
    }
    let _ = writeln!(x, "    <disk type='file' device='cdrom'>");
    let _ = writeln!(x, "      <driver name='qemu' type='raw'/>");
    let _ = writeln!(x, "      <source file='{}'/>", path(&spec.seed_iso));
    let _ = writeln!(x, "      <target dev='hdc' bus='ide'/>");
    let _ = writeln!(x, "      <readonly/>");
    let _ = writeln!(x, "    </disk>");
    for nic in &spec.nics {
        let _ = writeln!(x, "    <interface type='bridge'>");
        let _ = writeln!(x, "      <mac address='{}'/>", e(&nic.mac));
        let _ = writeln!(x, "      <source bridge='{}'/>", e(&nic.bridge));
        let _ = writeln!(x, "      <target dev='{}'/>", e(&nic.tap));
        let _ = writeln!(x, "      <model type='virtio'/>");
        let _ = writeln!(x, "      <mtu size='{}'/>", nic.mtu);
        let _ = writeln!(x, "    </interface>");
    }
    let _ = writeln!(x, "    <serial type='file'>");
    let _ = writeln!(
        x,
        "      <source path='{}' append='on'/>",
        path(&spec.console_log)
    );
    let _ = writeln!(x, "      <target port='0'/>");
    let _ = writeln!(x, "    </serial>");
    let _ = writeln!(x, "    <console type='file'>");
    let _ = writeln!(
        x,
        "      <source path='{}' append='on'/>",
        path(&spec.console_log)
    );
    let _ = writeln!(x, "      <target type='serial' port='0'/>");
    let _ = writeln!(x, "    </console>");
    let _ = writeln!(x, "  </devices>");
    let _ = writeln!(x, "</domain>");
    x
}

/// The tuchka metadata of a domain: `(cloud id, vm id)` from the element libvirt returns for
/// [`METADATA_NS`] (or from a whole domain XML). `None` when absent or malformed.
pub fn parse_vm_metadata(xml: &str) -> Option<(String, String)> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let node = doc
        .descendants()
        // libvirt's virDomainGetMetadata returns the element without its namespace declaration
        // (it already selected it by namespace URI), so an unqualified `vm` counts too.
        .find(|n| {
            n.tag_name().name() == "vm"
                && matches!(n.tag_name().namespace(), Some(METADATA_NS) | None)
        })?;
    Some((
        node.attribute("cloud")?.to_string(),
        node.attribute("id")?.to_string(),
    ))
}

/// Refuse specs libvirt (or the `virt` crate, which panics on NUL bytes) cannot take.
pub fn validate_spec(spec: &DomainSpec) -> Result<(), String> {
    let fields: [(&str, &str); 3] = [
        ("name", &spec.name),
        ("vm id", &spec.vm_id),
        ("cloud id", &spec.cloud_id),
    ];
    for (what, v) in fields {
        if v.is_empty() {
            return Err(format!("{what} is empty"));
        }
        if v.contains('\0') {
            return Err(format!("{what} contains a NUL byte"));
        }
    }
    if spec.name.contains('/') {
        return Err("name contains '/', which libvirt refuses".to_string());
    }
    if spec.vcpus == 0 {
        return Err("vcpus must be at least 1".to_string());
    }
    for v in &spec.volumes {
        if !v.path.is_absolute() {
            return Err(format!("volume path {} is not absolute", v.path.display()));
        }
        if v.id.is_empty() || !v.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!(
                "volume id {:?} is not of letters, digits and '-'",
                v.id
            ));
        }
        if !(v.target.len() == 3 && v.target.starts_with("vd") && v.target != "vda") {
            return Err(format!("volume target {:?} is not vdb..vdz", v.target));
        }
    }
    if spec.memory_mib < 16 {
        return Err(format!(
            "memory {} MiB is too small (at least 16 MiB, 128 MiB to boot Linux)",
            spec.memory_mib
        ));
    }
    for p in [&spec.root_disk, &spec.seed_iso, &spec.console_log] {
        if !p.is_absolute() {
            return Err(format!("path {} is not absolute", p.display()));
        }
    }
    for nic in &spec.nics {
        if !is_mac(&nic.mac) {
            return Err(format!(
                "NIC MAC {:?} is not of the form 52:54:00:12:34:56",
                nic.mac
            ));
        }
        if !is_ifname(&nic.tap) {
            return Err(format!(
                "tap name {:?} is not a valid interface name (1-15 chars, no '/', ':' or spaces)",
                nic.tap
            ));
        }
        if !is_ifname(&nic.bridge) {
            return Err(format!(
                "bridge name {:?} is not a valid interface name",
                nic.bridge
            ));
        }
        if !(68..=65535).contains(&nic.mtu) {
            return Err(format!("NIC MTU {} is out of range 68..65535", nic.mtu));
        }
    }
    Ok(())
}

/// `xx:xx:xx:xx:xx:xx` in hex.
pub fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// A Linux interface name: 1–15 bytes, no `/`, `:`, whitespace or NUL, not `.`/`..`.
pub fn is_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_the_five_and_control_chars() {
        assert_eq!(xml_escape(r#"a'<&">b"#), "a&apos;&lt;&amp;&quot;&gt;b");
        assert_eq!(xml_escape("x\u{1}y"), "x\u{fffd}y");
    }

    #[test]
    fn uuid_is_vm_id_or_stable_derivation() {
        let id = "0F2A6C1E-1111-4222-8333-444455556666";
        assert_eq!(domain_uuid("c", id), id.to_ascii_lowercase());
        let a = domain_uuid("cloud-a", "web-0");
        assert_eq!(a, domain_uuid("cloud-a", "web-0"));
        assert_ne!(a, domain_uuid("cloud-b", "web-0"));
        assert!(is_uuid(&a));
    }

    #[test]
    fn metadata_round_trips_from_libvirt_form() {
        let el = format!("<tuchka:vm xmlns:tuchka=\"{METADATA_NS}\" cloud=\"c&amp;1\" id=\"v\"/>");
        assert_eq!(parse_vm_metadata(&el), Some(("c&1".into(), "v".into())));
        // What virDomainGetMetadata really returns: the element without its namespace.
        assert_eq!(
            parse_vm_metadata("<vm cloud=\"x\" id=\"y\"/>"),
            Some(("x".into(), "y".into()))
        );
        assert_eq!(
            parse_vm_metadata("<o:vm xmlns:o='urn:other' cloud='x' id='y'/>"),
            None
        );
        assert_eq!(parse_vm_metadata("<vm cloud='x'/>"), None);
    }

    #[test]
    fn ifname_and_mac_rules() {
        assert!(is_ifname("tk100"));
        assert!(!is_ifname("a-very-long-name-x"));
        assert!(!is_ifname("a b"));
        assert!(is_mac("52:54:00:aB:cd:ef"));
        assert!(!is_mac("52:54:00:ab:cd"));
    }
}
