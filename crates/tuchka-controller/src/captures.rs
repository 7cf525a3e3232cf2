//! Images captured from VMs (`image create --from-vm`). Written next.

use rusqlite::Connection;
use tuchka_store::OpRow;

use crate::error::Result;
use crate::operations::Step;

/// Record what a host says of its captures.
pub fn apply_observed(
    _c: &Connection,
    _host_id: &str,
    _seen: &[tuchka_api::agent::CaptureObserved],
) -> Result<()> {
    Ok(())
}

/// How a capture stands.
pub fn evaluate(_c: &Connection, _o: &OpRow) -> Result<Step> {
    Ok(Step::Failed {
        error: "image capture is not built yet".into(),
        chain: vec![],
    })
}
