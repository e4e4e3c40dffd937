//! The database as a [`FlushTarget`]: each batch from the flush engine is applied in one
//! transaction, deletes and upserts in order, local and remote changes alike.

use async_trait::async_trait;
use kalphite::{Change, FlushTarget, TargetError};

use crate::database::Database;

#[async_trait]
impl FlushTarget for Database {
    async fn write(&self, batch: &[Change]) -> Result<(), TargetError> {
        self.apply_changes(batch)
            .await
            .map_err(|e| -> TargetError { Box::new(e) })
    }

    fn name(&self) -> &str {
        self.backend_name()
    }
}
