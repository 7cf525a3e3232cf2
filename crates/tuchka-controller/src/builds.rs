//! Image builds (`image build`). Written next.

use rusqlite::Connection;
use tuchka_store::OpRow;

use crate::error::Result;
use crate::operations::Step;
use crate::state::Controller;

/// How a build stands.
pub fn evaluate(_ctl: &Controller, _c: &Connection, _o: &OpRow) -> Result<Step> {
    Ok(Step::Failed {
        error: "image build is not built yet".into(),
        chain: vec![],
    })
}
