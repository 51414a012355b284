//! `meridian start` against real PostgreSQL: routing, conversion, CAS, merges,
//! DLQ, deletes, deadlines, errors and metrics.

mod common;
use common::*;

#[tokio::test]
async fn plain_upserts_without_userscript() {
    let f = fixture("plain_upserts", KV_SCHEMA, &[]).await;
    let body = batch(&[
        kv_row(1, "\\\\x01", "east", "2026-01-01T00:00:01Z", None, "1.0"),
        kv_row(2, "AQI=", "east", "2026-01-01T00:00:01Z", None, "1.0"),
    ]);
    let (status, text) = f.post("/plain_upserts/public", body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        f.dump("SELECT k, v, _source, _timestamp FROM kv ORDER BY k").await,
        vec![
            "1|\\x01|east|2026-01-01 00:00:01+00",
            "2|\\x0102|east|2026-01-01 00:00:01+00"
        ]
    );
}
