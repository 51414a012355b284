//! The `updated` floor at each position the slot is confirmed to, kept in
//! the source database so that a restarted changefeed stamps re-sent
//! transactions exactly as it stamped them the first time.
//!
//! `updated` is the commit time forced strictly increasing in WAL order, so a
//! transaction's value depends on the one before it. A restart decodes again
//! from the slot's confirmed position without that predecessor; without its
//! floor, a re-sent transaction whose commit time ran behind would get a
//! different `updated`, and a receiver could not tell the repeat from a new
//! change (its DLQ would hold the row twice). So before the slot is told a
//! new position, the floor at that position is written to
//! `public.meridian_changefeed_floors`; a connect reads the row for the
//! slot's confirmed position back. Rows are written only when the floor
//! moved, and rows older than the slot's restart position are pruned.

use anyhow::{Context, Result};

use super::pgoutput::lsn_to_string;
use super::{create_if_absent, Feed};
use crate::changefeed::Hlc;

const FLOORS: &str = "public.meridian_changefeed_floors";

impl Feed {
    /// Creates the table when absent and sets the floor for a stream that starts at the slot's confirmed
    /// position `lsn`: the one recorded there, or zero for a slot just
    /// `created` (whose old records are forgotten).
    pub(super) async fn load_floor(
        &mut self,
        db: &tokio_postgres::Client,
        lsn: u64,
        created: bool,
    ) -> Result<()> {
        create_if_absent(
            db,
            FLOORS,
            "(slot_name TEXT NOT NULL, lsn PG_LSN NOT NULL, nanos INT8 NOT NULL, \
             logical INT4 NOT NULL, PRIMARY KEY (slot_name, lsn))",
            "where the changefeed keeps the `updated` floor of its slot's position",
        )
        .await?;
        if created {
            db.execute(
                &format!("DELETE FROM {FLOORS} WHERE slot_name = $1"),
                &[&self.slot],
            )
            .await?;
            self.floor = Hlc::default();
            self.persisted_floor = None;
            return Ok(());
        }
        let row = db
            .query_opt(
                &format!(
                    "SELECT nanos, logical FROM {FLOORS} WHERE slot_name = $1 \
                     AND lsn <= $2::text::pg_lsn ORDER BY lsn DESC LIMIT 1"
                ),
                &[&self.slot, &lsn_to_string(lsn)],
            )
            .await?;
        // Not the higher in-memory value after a reconnect: the stream starts
        // again at `lsn`, and must stamp what follows as it did before.
        self.floor = row
            .map(|r| Hlc::new(r.get(0), r.get(1)))
            .unwrap_or_default();
        self.persisted_floor = Some(self.floor);
        Ok(())
    }

    /// Records the floor at `want_advance`, when it moved since the last
    /// record; call before the slot may be told that position (at most once
    /// per status interval, so a plain statement does).
    pub(super) async fn record_floor(&mut self, db: &tokio_postgres::Client) -> Result<()> {
        if self.persisted_floor == Some(self.floor) || self.want_advance == 0 {
            return Ok(());
        }
        db.execute(
            &format!(
                "INSERT INTO {FLOORS} (slot_name, lsn, nanos, logical) \
                 VALUES ($1, $2::text::pg_lsn, $3, $4) \
                 ON CONFLICT (slot_name, lsn) DO UPDATE SET nanos = EXCLUDED.nanos, logical = EXCLUDED.logical"
            ),
            &[
                &self.slot,
                &lsn_to_string(self.want_advance),
                &self.floor.nanos,
                &self.floor.logical,
            ],
        )
        .await
        .context("recording the changefeed's floor")?;
        self.persisted_floor = Some(self.floor);
        self.floors_to_prune = true;
        Ok(())
    }

    /// Deletes the floors below the newest one at or before the slot's
    /// restart position. Not its confirmed position: PostgreSQL writes that
    /// to disk only at a checkpoint (or with a new restart position), so after
    /// a crash the slot resumes from an older confirmed position, never below
    /// the restart position, and a restart must still find the floor there.
    pub(super) async fn prune_floors(&mut self, db: &tokio_postgres::Client) -> Result<()> {
        if !std::mem::take(&mut self.floors_to_prune) {
            return Ok(());
        }
        db.execute(
            &format!(
                "DELETE FROM {FLOORS} WHERE slot_name = $1 AND lsn < ( \
                 SELECT max(f.lsn) FROM {FLOORS} f JOIN pg_replication_slots s ON s.slot_name = f.slot_name \
                 WHERE f.slot_name = $1 AND f.lsn <= s.restart_lsn)"
            ),
            &[&self.slot],
        )
        .await?;
        Ok(())
    }
}
