//! The agent's loop: register, then forever: long-poll the desired state, fetch missing images,
//! reconcile, report (with the pass's duration). Survives controller restarts (it retries and
//! re-registers). Beside it, [`crate::console`] ships the VMs' console logs.
//!
//! It stops (with [`AgentError::Refused`], and the process exits non-zero) instead of retrying
//! when retrying cannot help: the controller refused the join token (unknown, expired, used
//! up) or the host name (`409`: another host has it), the host was revoked or removed (`401`
//! with code [`tuchka_api::CODE_HOST_REVOKED`] or [`tuchka_api::CODE_HOST_REMOVED`]: it never
//! retries with that credential), or TLS failed (a certificate fingerprint that does not
//! match, a bad URL). A credential refused later (another host has the name now) makes it
//! register again with its identity, which the controller then refuses the same way: an agent
//! that cannot act never keeps running looking healthy, and its host goes `down`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tuchka_api::agent::{HostDesired, HostRegister, HostRegistered, HostReport, GENERATION_HEADER};
use tuchka_client::{Client, ClientError, Conditional};

use crate::capture::Captures;
use tuchka_host::channel::{ChannelServer, MigrationAdmission};
use tuchka_host::metrics::{LoadSample, LoadSampler, VmCpuTime};
use tuchka_host::{AccelChoice, DirStorage, Libvirt, LinuxDataplane, Storage};

use crate::channel::{ChannelMover, ChannelMoverConfig};
use crate::identity::Identity;
use crate::mover::{Mover, NoMover};
use crate::reconcile::{reconcile, HostParts, Memory};

/// How an agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Host name in the cloud.
    pub name: String,
    /// Storage pool directory.
    pub pool: PathBuf,
    /// libvirt URI.
    pub libvirt_uri: String,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Join token (empty for the local agent on the unix socket).
    pub join_token: String,
    /// Underlay address other hosts reach this one on (VXLAN, migrations); empty for a
    /// single-host cloud.
    pub address: String,
    /// TCP port of the migration channel (on `address`; 0: none).
    pub channel_port: u16,
    /// The controller's TCP endpoint, if it has one (guests may not reach it).
    pub controller: Option<std::net::SocketAddr>,
    /// Where the migration channel's unix sockets live (the same path on every host).
    pub run_dir: PathBuf,
    /// Where the host's load figures come from.
    pub load_source: LoadSource,
}

/// Where an agent reads the host load it reports for the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadSource {
    /// The kernel's: CPU from `/proc/stat`, memory from `/proc/meminfo` (real hosts).
    #[default]
    Proc,
    /// The VMs': CPU is what this host's domains used (libvirt), memory what they were given —
    /// for simulated hosts that share one kernel, whose `/proc` shows the whole machine.
    Vms,
}

/// Setup failures; everything after setup is retried instead.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The host adapters could not be opened.
    #[error("agent setup failed")]
    Host(#[from] tuchka_host::HostError),
    /// The host's identity could not be read or kept.
    #[error("agent identity")]
    Identity(#[from] crate::identity::IdentityError),
    /// A worker thread died.
    #[error("agent worker failed: {0}")]
    Join(String),
    /// The controller refused this agent for good; retrying cannot help.
    #[error("{what}; not retrying")]
    Refused {
        /// What was refused, in words.
        what: String,
        /// The answer or failure.
        #[source]
        source: Box<ClientError>,
    },
}

/// Why `e` means the agent must stop instead of retrying, if it does. `registering`: the error
/// answered `POST /v1/agent/register` (where a `401` is a refused join token).
fn fatal(e: &ClientError, registering: bool) -> Option<String> {
    match e {
        ClientError::Tls { .. } => Some("cannot talk to the controller over TLS".into()),
        ClientError::InvalidUrl { .. } | ClientError::InvalidFingerprint { .. } => {
            Some("the controller address is unusable".into())
        }
        ClientError::Api { error, .. } if error.code == tuchka_api::CODE_HOST_REVOKED => Some(
            "the controller revoked this host (start the agent again with a join token to rejoin)"
                .into(),
        ),
        ClientError::Api { error, .. } if error.code == tuchka_api::CODE_HOST_REMOVED => Some(
            "the controller removed this host (tuchka host rm); to join this machine again as a new host, delete <pool>/identity/ and start the agent with a new join token"
                .into(),
        ),
        ClientError::Api { status: 409, .. } if registering => {
            Some("the controller refused to register this host".into())
        }
        ClientError::Api { status: 401, .. } if registering => {
            Some("the controller refused to register this host".into())
        }
        ClientError::Api { status: 400, .. } if registering => {
            Some("the controller refused to register this host".into())
        }
        _ => None,
    }
}

fn refused(e: ClientError, registering: bool) -> Result<ClientError, AgentError> {
    match fatal(&e, registering) {
        Some(what) => {
            // What else the controller refused on the way (e.g. why the identity did not do).
            let because = e
                .api_error()
                .map(|a| a.chain.join("; "))
                .unwrap_or_default();
            tracing::error!(error = %e, because = %because, "{what}; the agent stops");
            Err(AgentError::Refused {
                what,
                source: Box::new(e),
            })
        }
        None => Ok(e),
    }
}

/// Run the agent until the process ends.
pub async fn run(config: AgentConfig, client: Client) -> Result<(), AgentError> {
    let choice = config.accel;
    let (accel, accel_reason) =
        tokio::task::spawn_blocking(move || tuchka_host::probe_accel(choice))
            .await
            .map_err(|e| AgentError::Join(e.to_string()))?;
    if accel == tuchka_host::Accel::Tcg {
        tracing::warn!("guests use TCG (software emulation): {accel_reason}");
    } else {
        tracing::info!("guests use KVM: {accel_reason}");
    }
    let storage = DirStorage::open(&config.pool)?;
    let swept = storage.sweep_leftovers();
    tracing::info!(removed = swept.len(), pool = %config.pool.display(), "swept the pool's leftovers");
    let identity_dir = config.pool.join("identity");
    let channel_port =
        (!config.address.is_empty() && config.channel_port > 0).then_some(config.channel_port);
    let pool_text = config.pool.display().to_string();
    let facts = |s: &dyn Storage, load: Option<&LoadSample>| tuchka_api::agent::HostFacts {
        address: config.address.clone(),
        channel_port: channel_port.unwrap_or(0),
        pool: pool_text.clone(),
        cpu_usage: load.and_then(|l| l.cpu_usage).unwrap_or(0.0),
        ..tuchka_host::host_facts(s, accel, &accel_reason).unwrap_or_default()
    };
    let mut identity = Identity::load(&identity_dir)?;
    let reg = join(
        &client,
        &config,
        facts(&storage, None),
        &mut identity,
        &identity_dir,
        channel_port.is_some(),
    )
    .await?;
    tracing::info!(host = %config.name, id = %reg.host_id, "agent registered");
    let hypervisor: Arc<dyn tuchka_host::Hypervisor> =
        Arc::new(Libvirt::connect(&config.libvirt_uri, &reg.cloud_id)?);
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let (mover, _channel_server, channel_port) = channel(
        &config,
        identity.as_ref(),
        channel_port,
        &reg.cloud_id,
        &hypervisor,
        &storage,
    )
    .await;
    let parts = Arc::new(HostParts {
        hypervisor,
        storage,
        dataplane: Arc::new(LinuxDataplane::new(&config.pool, &reg.cloud_id)),
        mover,
        accel,
        cloud_id: reg.cloud_id.clone(),
        channel_port,
        underlay_address: config.address.parse().ok(),
        controller: config.controller,
    });
    let captures = Captures::new(&config.pool);
    let mut client = client.clone().with_token(Some(reg.credential.clone()));
    let mut host_id = reg.host_id.clone();
    let (ship_to, shipping) = tokio::sync::watch::channel((client.clone(), host_id.clone()));
    let _shipper = crate::console::spawn(parts.storage.clone(), shipping);
    let memory = Arc::new(Mutex::new(Memory::default()));
    let sampler = Arc::new(Mutex::new(LoadSampler::new()));
    let started = std::time::Instant::now();
    let mut after = 0u64;
    let mut backoff = Duration::from_millis(250);
    // The desired state last received and its ETag: an unchanged one comes back as a `304`.
    let mut current: Option<(HostDesired, String)> = None;
    loop {
        let fetched = client
            .get_if_changed::<HostDesired>(
                &format!("/v1/agent/hosts/{host_id}/desired?after={after}"),
                current.as_ref().map(|(_, tag)| tag.as_str()),
            )
            .await;
        let desired: HostDesired = match fetched {
            Ok(answer) => match unchanged_or_new(&mut current, answer) {
                Some(d) => d,
                None => {
                    tracing::warn!("the controller said unchanged of a desired state this agent does not have; asking again");
                    continue;
                }
            },
            Err(e) => {
                let e = refused(e, false)?;
                tracing::warn!(error = %e, "cannot fetch desired state; retrying");
                if e.status() == Some(404) || e.status() == Some(401) {
                    let reg = join(
                        &client,
                        &config,
                        facts(parts.storage.as_ref(), None),
                        &mut identity,
                        &identity_dir,
                        false,
                    )
                    .await?;
                    host_id = reg.host_id;
                    client = client.with_token(Some(reg.credential));
                    current = None;
                    ship_to.send_replace((client.clone(), host_id.clone()));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(250);
        captures.sync(&desired, &parts, &client, &host_id);
        let pass_started = std::time::Instant::now();
        let image_errors = fetch_images(&client, &parts, &desired).await;
        let (p, m, d, sm) = (
            parts.clone(),
            memory.clone(),
            desired.clone(),
            sampler.clone(),
        );
        let (pass, load) = tokio::task::spawn_blocking(move || {
            let load = sample_load(&p, &sm, started.elapsed());
            let cpu: HashMap<String, f64> = load
                .as_ref()
                .map(|l| l.vm_cores.clone().into_iter().collect())
                .unwrap_or_default();
            let mut mem = m.lock().unwrap_or_else(|p| p.into_inner());
            (reconcile(&p, &d, &mut mem, &image_errors, &cpu), load)
        })
        .await
        .map_err(|e| AgentError::Join(e.to_string()))?;
        let mut report: HostReport = pass.report;
        report.facts = facts(parts.storage.as_ref(), load.as_ref());
        report.captures = captures.observed();
        // A capture under way is reported as it goes, not only when the cloud changes.
        let capturing = report.captures.iter().any(|c| {
            matches!(
                c.status,
                tuchka_api::agent::CaptureStatus::Copying
                    | tuchka_api::agent::CaptureStatus::Uploading
            )
        });
        report.facts.pass_ms = pass_started.elapsed().as_millis() as u64;
        if let Some(l) = &load {
            report.facts.memory_in_use_mib = l.memory_in_use_mib;
            if config.load_source == LoadSource::Vms {
                let cpus = f64::from(report.facts.cpus.max(1));
                report.facts.cpu_usage = (l.vm_cores.values().sum::<f64>() / cpus).min(1.0);
                report.facts.memory_in_use_mib = desired
                    .vms
                    .iter()
                    .filter(|v| v.power != tuchka_api::PowerState::Stopped)
                    .map(|v| v.memory_mib)
                    .sum();
            }
        }
        if let Err(e) = client
            .post_empty(&format!("/v1/agent/hosts/{host_id}/report"), &report)
            .await
        {
            let e = refused(e, false)?;
            tracing::warn!(error = %e, "cannot send report");
        }
        if capturing {
            after = 0;
            tokio::time::sleep(Duration::from_secs(1)).await;
        } else if pass.settled {
            after = desired.generation;
        } else {
            after = 0;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The host's load now (CPU and memory, each VM's CPU), from /proc and libvirt; None on the
/// first sample or when they cannot be read.
/// What a desired-state answer means for the host holding `current`: a new desired state
/// (kept, with its ETag, as `current`), or the one it has, at the generation the `304` names.
/// None for a `304` about a desired state it does not have.
pub fn unchanged_or_new(
    current: &mut Option<(HostDesired, String)>,
    answer: Conditional<HostDesired>,
) -> Option<HostDesired> {
    match answer {
        Conditional::Fresh(d, tag) => {
            *current = tag.map(|tag| (d.clone(), tag));
            Some(d)
        }
        Conditional::NotModified(headers) => {
            let (d, _) = current.as_mut()?;
            if let Some(g) = headers
                .get(GENERATION_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
            {
                d.generation = g;
            }
            Some(d.clone())
        }
    }
}

fn sample_load(
    parts: &HostParts,
    sampler: &Mutex<LoadSampler>,
    at: Duration,
) -> Option<LoadSample> {
    let host = tuchka_host::metrics::read_host_counters().ok()?;
    let vms: Vec<VmCpuTime> = parts
        .hypervisor
        .list()
        .unwrap_or_default()
        .into_iter()
        .map(|d| VmCpuTime {
            vm_id: d.vm_id,
            cpu_time_ns: d.cpu_time_ns,
        })
        .collect();
    Some(
        sampler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sample(at, &host, &vms),
    )
}

/// Register with the identity this host keeps (or, the first time, with the join token) and
/// keep what the controller answers; with `want_certificate`, also get (once) the migration
/// channel's certificate for a key made here.
async fn join(
    client: &Client,
    config: &AgentConfig,
    facts: tuchka_api::agent::HostFacts,
    identity: &mut Option<Identity>,
    dir: &std::path::Path,
    want_certificate: bool,
) -> Result<HostRegistered, AgentError> {
    let mut reg = register(client, config, facts.clone(), identity.as_ref(), None).await?;
    let same = identity
        .as_ref()
        .is_some_and(|i| i.host_id == reg.host_id && i.credential == reg.credential);
    if !same {
        // A first join, or the controller no longer knew us: a new identity, no certificate.
        *identity = Some(Identity::new(&reg.host_id, &reg.credential));
    }
    let Some(id) = identity.as_mut() else {
        return Ok(reg);
    };
    if !same {
        // Kept at once: an agent stopped before it has its certificate still comes back as
        // this host.
        id.save(dir)?;
    }
    if want_certificate && id.channel().is_none() {
        match tuchka_pki::create_host_key(&reg.host_id) {
            Ok(key) => {
                let r = register(client, config, facts, Some(id), Some(key.csr_pem)).await?;
                if let (Some(cert), Some(ca)) = (r.certificate_pem.clone(), r.ca_pem.clone()) {
                    id.key_pem = Some(key.key_pem);
                    id.cert_pem = Some(cert);
                    id.ca_pem = Some(ca);
                    tracing::info!("got the migration channel's certificate");
                } else {
                    tracing::warn!("the controller issued no channel certificate (is it started without --listen?): this host cannot take part in migrations");
                }
                reg = r;
            }
            Err(e) => tracing::warn!(error = %e, "cannot make the migration channel's key"),
        }
    }
    id.save(dir)?;
    Ok(reg)
}

/// The migration channel of this host: its server on the underlay address, the mover that
/// sends VMs through the other hosts' channels. Without a certificate, or without an underlay
/// address, the host has none (and says why when a migration needs it).
async fn channel(
    config: &AgentConfig,
    identity: Option<&Identity>,
    port: Option<u16>,
    cloud_id: &str,
    hypervisor: &Arc<dyn tuchka_host::Hypervisor>,
    storage: &Arc<dyn Storage>,
) -> (Arc<dyn Mover>, Option<ChannelServer>, Option<u16>) {
    let none = || -> (Arc<dyn Mover>, Option<ChannelServer>, Option<u16>) {
        (Arc::new(NoMover::default()), None, None)
    };
    let (Some(port), Some((ca, cert, key))) = (port, identity.and_then(Identity::channel)) else {
        return none();
    };
    let Ok(ip) = config.address.parse::<std::net::IpAddr>() else {
        tracing::warn!(address = %config.address, "the underlay address is not an IP address: no migration channel");
        return none();
    };
    let configs = tuchka_host::channel::server_config(ca, cert, key)
        .and_then(|s| Ok((s, tuchka_host::channel::client_config(ca, cert, key)?)));
    let (server_tls, client_tls) = match configs {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e.chain(), "the migration channel's certificate is unusable: no channel");
            return none();
        }
    };
    let admission = MigrationAdmission::new(
        &config.run_dir,
        cloud_id,
        &libvirt_socket(&config.libvirt_uri),
    );
    let server = match ChannelServer::bind(
        std::net::SocketAddr::new(ip, port),
        server_tls,
        Arc::new(admission.clone()),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e.chain(), "cannot listen for the migration channel: this host cannot take part in migrations");
            return none();
        }
    };
    let mover = ChannelMover::new(ChannelMoverConfig {
        rt: tokio::runtime::Handle::current(),
        tls: client_tls,
        hypervisor: hypervisor.clone(),
        storage: storage.clone(),
        pool: config.pool.clone(),
        run_dir: config.run_dir.clone(),
        cloud_id: cloud_id.to_string(),
        admission,
    });
    (Arc::new(mover), Some(server), Some(port))
}

/// The local libvirtd's socket for libvirt URI `uri` (its `socket=` parameter, else the
/// system socket).
pub fn libvirt_socket(uri: &str) -> std::path::PathBuf {
    uri.split_once('?')
        .and_then(|(_, q)| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .map(std::path::PathBuf::from)
        })
        .unwrap_or_else(|| std::path::PathBuf::from(tuchka_host::channel::LIBVIRT_SOCKET))
}

/// Register until the controller answers; stops at once when it refuses (see [`fatal`]).
async fn register(
    client: &Client,
    config: &AgentConfig,
    facts: tuchka_api::agent::HostFacts,
    identity: Option<&Identity>,
    csr_pem: Option<String>,
) -> Result<HostRegistered, AgentError> {
    let req = HostRegister {
        name: config.name.clone(),
        join_token: config.join_token.clone(),
        facts,
        identity: identity.map(|i| tuchka_api::agent::HostIdentity {
            host_id: i.host_id.clone(),
            credential: i.credential.clone(),
        }),
        csr_pem,
    };
    let mut wait = Duration::from_millis(200);
    loop {
        match client
            .post::<_, HostRegistered>("/v1/agent/register", &req)
            .await
        {
            Ok(r) => return Ok(r),
            Err(e) => {
                let e = refused(e, true)?;
                log_register_error(&e);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn log_register_error(e: &ClientError) {
    tracing::warn!(error = %e, "cannot register with the controller; retrying");
}

/// Fetch every image a desired VM needs and the cache lacks. Returns the ones that failed.
async fn fetch_images(
    client: &Client,
    parts: &Arc<HostParts>,
    desired: &HostDesired,
) -> HashMap<String, String> {
    let mut errors = HashMap::new();
    let cached = parts.storage.cached_images().unwrap_or_default();
    let mut needed: Vec<(&str, &str)> = desired
        .vms
        .iter()
        .filter(|v| !cached.contains(&v.image_sha256))
        .map(|v| (v.image_sha256.as_str(), v.image_file_sha256.as_str()))
        .collect();
    needed.sort();
    needed.dedup();
    for (sha, file_sha) in needed {
        let mut last = String::new();
        // A corrupted transfer is detected by the digest check and fetched again once.
        for attempt in 1..=2 {
            match fetch_one(client, parts, sha, file_sha).await {
                Ok(()) => {
                    tracing::info!(image = %sha, attempt, "image cached");
                    last.clear();
                    break;
                }
                Err(e) => {
                    tracing::warn!(image = %sha, attempt, error = %e, "image fetch failed");
                    last = e;
                }
            }
        }
        if !last.is_empty() {
            errors.insert(sha.to_string(), last);
        }
    }
    errors
}

async fn fetch_one(
    client: &Client,
    parts: &Arc<HostParts>,
    sha: &str,
    file_sha: &str,
) -> Result<(), String> {
    let partial = parts.storage.image_partial_path(sha);
    client
        .download(&format!("/v1/agent/images/{sha}"), &partial)
        .await
        .map_err(|e| e.to_string())?;
    let (p, s, f) = (parts.clone(), sha.to_string(), file_sha.to_string());
    tokio::task::spawn_blocking(move || p.storage.commit_image(&s, &f).map(|_| ()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuchka_api::ApiError;

    #[test]
    fn a_304_keeps_the_desired_state_at_the_new_generation_and_a_200_replaces_it() {
        let mut current = None;
        let first = HostDesired {
            generation: 5,
            cloud_id: "c".into(),
            ..Default::default()
        };
        // A 304 about something this host does not have is not taken.
        let none = unchanged_or_new(&mut current, Conditional::NotModified(Default::default()));
        assert!(none.is_none());
        let got = unchanged_or_new(
            &mut current,
            Conditional::Fresh(first.clone(), Some("\"t1\"".into())),
        );
        assert_eq!(got, Some(first.clone()));
        let mut headers = tuchka_client::HeaderMap::new();
        headers.insert(GENERATION_HEADER, "9".parse().expect("value"));
        let same = unchanged_or_new(&mut current, Conditional::NotModified(headers))
            .expect("the one it has");
        assert_eq!((same.generation, same.cloud_id.as_str()), (9, "c"));
        // Without an ETag nothing is kept to be confirmed later.
        unchanged_or_new(&mut current, Conditional::Fresh(first, None));
        assert!(current.is_none());
    }

    fn api(status: u16, code: &str) -> ClientError {
        ClientError::Api {
            status,
            error: ApiError {
                code: code.into(),
                message: "m".into(),
                chain: vec![],
            },
        }
    }

    #[test]
    fn only_refusals_that_retrying_cannot_fix_stop_the_agent() {
        // A refused join token or host name stops registration; elsewhere a 401 re-registers.
        assert!(fatal(&api(401, "Unauthorized"), true).is_some());
        assert!(fatal(&api(400, "InvalidName"), true).is_some());
        assert!(fatal(&api(401, "Unauthorized"), false).is_none());
        assert!(fatal(&api(404, "HostNotFound"), false).is_none());
        // A revoked host stops wherever it hears so.
        let revoked = fatal(&api(401, tuchka_api::CODE_HOST_REVOKED), false);
        assert!(revoked.expect("fatal").contains("revoked"));
        // So does a removed one; a name another host has, or an expired token, stop joining.
        let removed = fatal(&api(401, tuchka_api::CODE_HOST_REMOVED), false);
        assert!(removed.expect("fatal").contains("removed"));
        assert!(fatal(&api(409, tuchka_api::CODE_HOST_NAME_TAKEN), true).is_some());
        assert!(fatal(&api(401, "JoinTokenExpired"), true).is_some());
        assert!(fatal(&api(409, "VmMigrating"), false).is_none());
        // TLS failures (a wrong fingerprint) stop; an unreachable controller is retried.
        let tls = ClientError::Tls {
            endpoint: "https://x:1".into(),
            reason: "certificate fingerprint mismatch".into(),
        };
        assert!(fatal(&tls, true).is_some());
        assert!(fatal(&api(500, "Internal"), true).is_none());
        let down = ClientError::Connect {
            endpoint: "https://x:1".into(),
            reason: "refused".into(),
            source: "refused".into(),
        };
        assert!(fatal(&down, true).is_none());
    }
}
