//! The JavaScript engine behind [`super::Userscript`]: placeholder until the
//! QuickJS runtime lands. Loading any script fails with a clear error.

use std::path::Path;

use super::*;

pub struct Engine {
    config: ScriptConfig,
}

impl Engine {
    pub fn load(path: &Path, _limits: Limits) -> Result<Self, ScriptError> {
        Err(ScriptError::Load(format!("{}: userscripts are not supported yet", path.display())))
    }
    pub fn config(&self) -> &ScriptConfig {
        &self.config
    }
    pub async fn dispatch(&self, _d: &str, _s: &str, _t: Option<&str>, _b: Vec<Mutation>) -> Result<Vec<Routed>, ScriptError> {
        unreachable!()
    }
    pub async fn map(&self, _t: &TableName, b: Vec<Mutation>) -> Result<Vec<Mutation>, ScriptError> {
        Ok(b)
    }
    pub async fn merge(&self, _t: &TableName, _c: Vec<Conflict>) -> Result<Vec<MergeOutcome>, ScriptError> {
        unreachable!()
    }
    pub async fn apply(&self, _t: &TableName, _o: Vec<ApplyOp>, _tx: &mut dyn ScriptTx) -> Result<(), ScriptError> {
        unreachable!()
    }
}
