//! Pure decisions of the reconcile loop: given what a VM should be and what libvirt shows, what
//! to do next and what to report. No I/O, so every case is unit-tested.

use std::time::Duration;

use tuchka_api::agent::VmDesired;
use tuchka_api::{PowerState, VmState};
use tuchka_host::DomainState;

/// Re-send the ACPI power button this often while a guest is shutting down (a press that
/// arrives before the guest's acpid runs is lost).
pub const SHUTDOWN_RESEND: Duration = Duration::from_secs(3);

/// One action on a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do.
    None,
    /// Prepare disk and seed, define the domain.
    Create,
    /// Start it.
    Start,
    /// Press the power button.
    Shutdown,
    /// Power off now.
    Destroy,
    /// Pause.
    Suspend,
    /// Unpause.
    Resume,
    /// ACPI reboot.
    Reboot,
}

/// What the agent knows of one VM besides its domain's state: what it remembers between
/// passes, and why libvirt has the domain where it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmMemory {
    /// How long ago the first shutdown request of the current stop was sent.
    pub shutdown_since: Option<Duration>,
    /// How long ago the last shutdown request was sent.
    pub shutdown_last: Option<Duration>,
    /// Highest reboot request carried out.
    pub reboot_done: u64,
    /// Highest resume request carried out (of a VM its host paused).
    pub resume_done: u64,
    /// qemu paused it because a write failed (the pool is full).
    pub paused_on_io_error: bool,
    /// It is off because the guest powered itself off.
    pub powered_off_by_guest: bool,
}

/// The next action for `want` given the domain's observed `state` (None: not defined).
pub fn next_action(want: &VmDesired, state: Option<&DomainState>, mem: &VmMemory) -> Action {
    let Some(state) = state else {
        return Action::Create;
    };
    match (want.power, state) {
        (_, DomainState::Crashed) => Action::Destroy,
        // A VM that runs once (an image builder) stays off once its guest powered off.
        (PowerState::Running, DomainState::ShutOff)
            if want.run_once && mem.powered_off_by_guest =>
        {
            Action::None
        }
        (PowerState::Running, DomainState::ShutOff) => Action::Start,
        // Paused by its host on a full pool: only a resume request continues it (the user
        // frees space first), never the loop on its own.
        (PowerState::Running, DomainState::Paused)
            if mem.paused_on_io_error && want.resume_seq <= mem.resume_done =>
        {
            Action::None
        }
        (PowerState::Running, DomainState::Paused) => Action::Resume,
        (PowerState::Running, DomainState::Running) if want.reboot_seq > mem.reboot_done => {
            Action::Reboot
        }
        (PowerState::Paused, DomainState::ShutOff) => Action::Start,
        (PowerState::Paused, DomainState::Running) => Action::Suspend,
        (PowerState::Stopped, DomainState::ShutOff) => Action::None,
        (PowerState::Stopped, _) if want.force_stop => Action::Destroy,
        // A paused guest cannot see the power button: resume it first.
        (PowerState::Stopped, DomainState::Paused) => Action::Resume,
        (
            PowerState::Stopped,
            DomainState::Running | DomainState::ShuttingDown | DomainState::Other(_),
        ) => match (mem.shutdown_since, mem.shutdown_last) {
            (Some(since), _) if since >= Duration::from_secs(u64::from(want.stop_timeout_s)) => {
                Action::Destroy
            }
            (Some(_), Some(last)) if last < SHUTDOWN_RESEND => Action::None,
            _ => Action::Shutdown,
        },
        _ => Action::None,
    }
}

/// What the source of a migration does in a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutgoingAction {
    /// Nothing (waiting for `go`, or the job runs, or it ended and the controller decides).
    None,
    /// Start the job.
    Begin,
    /// Stop the running job: the VM stays here.
    Abort,
}

/// The next step of the source of a migration. `go`/`abort`: what the controller says; `job`:
/// how this agent's job stands (None: it has none, e.g. it restarted); `domain_here`: the VM's
/// domain is still on this host. Never starts a job for a VM whose domain is gone (it moved).
pub fn outgoing_action(
    go: bool,
    abort: bool,
    job: Option<tuchka_api::agent::MigrationStatus>,
    domain_here: bool,
) -> OutgoingAction {
    use tuchka_api::agent::MigrationStatus as S;
    match (abort, go, job) {
        (true, _, Some(S::Running)) => OutgoingAction::Abort,
        (true, _, _) => OutgoingAction::None,
        (false, true, None) if domain_here => OutgoingAction::Begin,
        _ => OutgoingAction::None,
    }
}

/// The state to report for a VM whose domain shows `state`.
pub fn observed_state(want: &VmDesired, state: Option<&DomainState>) -> VmState {
    match state {
        None => VmState::Starting,
        Some(DomainState::Running) if want.power == PowerState::Stopped => VmState::Stopping,
        Some(DomainState::Running) => VmState::Running,
        Some(DomainState::ShuttingDown) => VmState::Stopping,
        Some(DomainState::Paused) if want.power == PowerState::Stopped => VmState::Stopping,
        Some(DomainState::Paused) => VmState::Paused,
        Some(DomainState::ShutOff) if want.power == PowerState::Stopped => VmState::Stopped,
        Some(DomainState::ShutOff) => VmState::Starting,
        Some(DomainState::Crashed) => VmState::Error,
        Some(DomainState::Other(_)) => VmState::Starting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(power: PowerState) -> VmDesired {
        VmDesired {
            id: "id".into(),
            name: "web-0".into(),
            domain: "tk-x-web-0".into(),
            power,
            cpus: 1,
            memory_mib: 256,
            disk_mib: 1024,
            image_sha256: "a".into(),
            image_file_sha256: "a".into(),
            nics: vec![],
            user_data: None,
            ssh_keys: vec![],
            reboot_seq: 0,
            force_stop: false,
            stop_timeout_s: 60,
            migration: None,
            max_cpus: 1,
            volumes: vec![],
            resume_seq: 0,
            run_once: false,
        }
    }

    #[test]
    fn a_vm_its_host_paused_waits_for_a_resume_request() {
        let mut w = vm(PowerState::Running);
        let mut m = VmMemory {
            paused_on_io_error: true,
            ..Default::default()
        };
        let paused = Some(&DomainState::Paused);
        assert_eq!(next_action(&w, paused, &m), Action::None);
        w.resume_seq = 1;
        assert_eq!(next_action(&w, paused, &m), Action::Resume);
        m.resume_done = 1;
        assert_eq!(next_action(&w, paused, &m), Action::None);
        assert_eq!(observed_state(&w, paused), VmState::Paused);
    }

    #[test]
    fn a_run_once_vm_stays_off_after_its_guest_powered_off() {
        let mut w = vm(PowerState::Running);
        w.run_once = true;
        let off = Some(&DomainState::ShutOff);
        assert_eq!(next_action(&w, off, &VmMemory::default()), Action::Start);
        let m = VmMemory {
            powered_off_by_guest: true,
            ..Default::default()
        };
        assert_eq!(next_action(&w, off, &m), Action::None);
        w.run_once = false;
        assert_eq!(next_action(&w, off, &m), Action::Start);
    }

    #[test]
    fn the_source_begins_once_told_and_aborts_only_a_running_job() {
        use tuchka_api::agent::MigrationStatus as S;
        assert_eq!(
            outgoing_action(false, false, None, true),
            OutgoingAction::None
        );
        assert_eq!(
            outgoing_action(true, false, None, true),
            OutgoingAction::Begin
        );
        assert_eq!(
            outgoing_action(true, false, None, false),
            OutgoingAction::None,
            "a domain that left is never moved again"
        );
        assert_eq!(
            outgoing_action(true, false, Some(S::Running), true),
            OutgoingAction::None
        );
        assert_eq!(
            outgoing_action(true, false, Some(S::Failed), true),
            OutgoingAction::None
        );
        assert_eq!(
            outgoing_action(true, true, Some(S::Running), true),
            OutgoingAction::Abort
        );
        assert_eq!(
            outgoing_action(true, true, Some(S::Completed), false),
            OutgoingAction::None
        );
        assert_eq!(
            outgoing_action(false, true, None, true),
            OutgoingAction::None
        );
    }

    #[test]
    fn creates_then_starts_then_rests() {
        let w = vm(PowerState::Running);
        let m = VmMemory::default();
        assert_eq!(next_action(&w, None, &m), Action::Create);
        assert_eq!(
            next_action(&w, Some(&DomainState::ShutOff), &m),
            Action::Start
        );
        assert_eq!(
            next_action(&w, Some(&DomainState::Running), &m),
            Action::None
        );
        assert_eq!(
            observed_state(&w, Some(&DomainState::Running)),
            VmState::Running
        );
        assert_eq!(observed_state(&w, None), VmState::Starting);
    }

    #[test]
    fn pause_and_resume() {
        let m = VmMemory::default();
        assert_eq!(
            next_action(&vm(PowerState::Paused), Some(&DomainState::Running), &m),
            Action::Suspend
        );
        assert_eq!(
            next_action(&vm(PowerState::Running), Some(&DomainState::Paused), &m),
            Action::Resume
        );
        assert_eq!(
            observed_state(&vm(PowerState::Paused), Some(&DomainState::Paused)),
            VmState::Paused
        );
    }

    #[test]
    fn stop_presses_the_button_resends_then_forces() {
        let w = vm(PowerState::Stopped);
        let running = DomainState::Running;
        let mut m = VmMemory::default();
        assert_eq!(next_action(&w, Some(&running), &m), Action::Shutdown);
        m.shutdown_since = Some(Duration::from_secs(1));
        m.shutdown_last = Some(Duration::from_secs(1));
        assert_eq!(next_action(&w, Some(&running), &m), Action::None);
        m.shutdown_last = Some(Duration::from_secs(4));
        assert_eq!(next_action(&w, Some(&running), &m), Action::Shutdown);
        m.shutdown_since = Some(Duration::from_secs(60));
        assert_eq!(next_action(&w, Some(&running), &m), Action::Destroy);
        assert_eq!(observed_state(&w, Some(&running)), VmState::Stopping);
        assert_eq!(
            observed_state(&w, Some(&DomainState::ShutOff)),
            VmState::Stopped
        );
        assert_eq!(
            next_action(&w, Some(&DomainState::ShutOff), &m),
            Action::None
        );
    }

    #[test]
    fn force_stop_and_paused_stop() {
        let mut w = vm(PowerState::Stopped);
        let m = VmMemory::default();
        assert_eq!(
            next_action(&w, Some(&DomainState::Paused), &m),
            Action::Resume
        );
        w.force_stop = true;
        assert_eq!(
            next_action(&w, Some(&DomainState::Running), &m),
            Action::Destroy
        );
        assert_eq!(
            next_action(&w, Some(&DomainState::Paused), &m),
            Action::Destroy
        );
    }

    #[test]
    fn reboot_once_per_request() {
        let mut w = vm(PowerState::Running);
        w.reboot_seq = 2;
        let mut m = VmMemory {
            reboot_done: 1,
            ..Default::default()
        };
        assert_eq!(
            next_action(&w, Some(&DomainState::Running), &m),
            Action::Reboot
        );
        m.reboot_done = 2;
        assert_eq!(
            next_action(&w, Some(&DomainState::Running), &m),
            Action::None
        );
    }

    #[test]
    fn crashed_is_destroyed_and_reported_as_error() {
        let w = vm(PowerState::Running);
        assert_eq!(
            next_action(&w, Some(&DomainState::Crashed), &VmMemory::default()),
            Action::Destroy
        );
        assert_eq!(
            observed_state(&w, Some(&DomainState::Crashed)),
            VmState::Error
        );
    }
}
