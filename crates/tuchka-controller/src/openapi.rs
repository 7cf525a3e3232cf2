//! The OpenAPI document, generated from the handlers and the `tuchka-api` types. It is committed
//! as `docs/openapi.json`; a test fails when the two drift apart.

use utoipa::OpenApi;

use crate::handlers as api;
use crate::observe;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tuchka",
        description = "A small cloud for your own hardware: images, VM groups, networks, hosts. Long actions answer 202 with an Operation.",
        version = "1"
    ),
    paths(
        api::list_images,
        api::upload_image,
        api::get_image,
        api::delete_image,
        api::list_networks,
        api::create_network,
        api::get_network,
        api::delete_network,
        api::list_rules,
        api::add_rule,
        api::delete_rule,
        api::list_forwards,
        api::add_forward,
        api::delete_forward,
        api::list_groups,
        api::create_group,
        api::get_group,
        api::scale_group,
        api::delete_group,
        api::list_vms,
        api::get_vm,
        api::delete_vm,
        api::vm_console,
        api::vm_action,
        api::migrate_vm,
        api::list_hosts,
        api::get_host,
        api::revoke_host,
        api::remove_host,
        api::drain_host,
        api::undrain_host,
        api::create_join_token,
        api::balance_status,
        api::balance_plan,
        api::balance_apply,
        api::list_operations,
        api::get_operation,
        api::events,
        api::openapi,
        api::register,
        api::host_desired,
        api::host_report,
        api::image_file,
        api::list_volumes,
        api::create_volume,
        api::get_volume,
        api::delete_volume,
        api::attach_volume,
        api::detach_volume,
        api::resize_volume,
        api::resize_vm,
        api::storage,
        api::image_cache,
        api::prune_image_cache,
        api::capture_image,
        api::build_image,
        api::receive_capture,
        observe::metrics,
        observe::history,
        observe::console_log,
        observe::host_consoles,
        observe::ui_login,
    ),
    components(schemas(
        tuchka_api::ApiError,
        tuchka_api::Image,
        tuchka_api::ImageCapture,
        tuchka_api::ImageBuild,
        tuchka_api::CachedImage,
        tuchka_api::CachePrune,
        tuchka_api::VmResize,
        tuchka_api::Volume,
        tuchka_api::VolumeState,
        tuchka_api::VolumeCreate,
        tuchka_api::VolumeAttach,
        tuchka_api::VolumeResize,
        tuchka_api::Storage,
        tuchka_api::HostStorage,
        tuchka_api::StoreStorage,
        tuchka_api::Network,
        tuchka_api::NetworkCreate,
        tuchka_api::VmAddress,
        tuchka_api::Group,
        tuchka_api::GroupCreate,
        tuchka_api::GroupScale,
        tuchka_api::Vm,
        tuchka_api::VmState,
        tuchka_api::PowerState,
        tuchka_api::VmStop,
        tuchka_api::Host,
        tuchka_api::JoinToken,
        tuchka_api::JoinTokenCreate,
        tuchka_api::HostRemoved,
        tuchka_api::Operation,
        tuchka_api::OperationKind,
        tuchka_api::OperationState,
        tuchka_api::OperationPhase,
        tuchka_api::PhaseState,
        tuchka_api::HostState,
        tuchka_api::NetworkState,
        tuchka_api::Direction,
        tuchka_api::RuleAction,
        tuchka_api::PlacementPolicy,
        tuchka_api::Migration,
        tuchka_api::MigrationMode,
        tuchka_api::MigrationPhase,
        tuchka_api::VmMigrate,
        tuchka_api::HostDrain,
        tuchka_api::Drain,
        tuchka_api::Unmovable,
        tuchka_api::BalanceMode,
        tuchka_api::HostLoad,
        tuchka_api::BalanceMove,
        tuchka_api::BalancePlan,
        tuchka_api::BalanceDecision,
        tuchka_api::BalanceStatus,
        tuchka_api::Event,
        tuchka_api::CheckItem,
        tuchka_api::Rule,
        tuchka_api::RuleCreate,
        tuchka_api::Forward,
        tuchka_api::ForwardCreate,
        tuchka_api::agent::HostRegister,
        tuchka_api::agent::HostRegistered,
        tuchka_api::agent::HostFacts,
        tuchka_api::agent::HostDesired,
        tuchka_api::agent::VmDesired,
        tuchka_api::agent::NicDesired,
        tuchka_api::agent::NetworkDesired,
        tuchka_api::agent::DhcpHost,
        tuchka_api::agent::HostReport,
        tuchka_api::agent::VmObserved,
        tuchka_api::agent::NetworkObserved,
        tuchka_api::agent::PortMatch,
        tuchka_api::agent::IngressRule,
        tuchka_api::agent::EgressRule,
        tuchka_api::agent::ForwardDesired,
        tuchka_api::agent::VxlanDesired,
        tuchka_api::agent::HostIdentity,
        tuchka_api::agent::VmRemoval,
        tuchka_api::agent::PeerHost,
        tuchka_api::agent::VmMigrationDesired,
        tuchka_api::agent::Orphan,
        tuchka_api::agent::OrphanKind,
        tuchka_api::agent::MigrationStatus,
        tuchka_api::agent::MigrationObserved,
        tuchka_api::ConsoleLog,
        tuchka_api::LoadHistory,
        tuchka_api::HostHistory,
        tuchka_api::LoadPoint,
        tuchka_api::UiLogin,
        tuchka_api::agent::ConsoleUpload,
        tuchka_api::agent::ConsoleData,
        tuchka_api::agent::ConsoleUploaded,
        tuchka_api::agent::ConsoleNext,
    ))
)]
struct ApiDoc;

/// The document as pretty JSON with a trailing newline.
pub fn document() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    /// `docs/openapi.json` must be what the code generates. To refresh it after an API change:
    /// `TUCHKA_BLESS=1 cargo test -p tuchka-controller openapi`.
    #[test]
    fn committed_openapi_matches_the_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let now = super::document();
        if std::env::var_os("TUCHKA_BLESS").is_some() {
            std::fs::write(&path, &now).expect("write docs/openapi.json");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == now,
            "docs/openapi.json is out of date with the API types; run: TUCHKA_BLESS=1 cargo test -p tuchka-controller openapi"
        );
    }
}
