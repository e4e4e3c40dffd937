//! The workload-S load generator runs every scenario end to end (tiny sizes) against a
//! real server with tokens, so `kalphite bench sync` keeps working.

mod common;

use std::time::Duration;

use common::*;
use kalphite_sync::loadgen::{BenchOptions, Scenario, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_at_small_scale() {
    let server = start(config(memory_db().await)).await;
    let mut opts = BenchOptions::new(server.url());
    opts.token_secret = Some(SECRET.to_vec());
    opts.s1_changes = 20;
    opts.s1_warmup = 5;
    opts.s2_readers = vec![3];
    opts.s2_changes = 50;
    opts.s3_rooms = 5;
    opts.s3_changes = 10;
    opts.s4_clients = 20;
    opts.s4_rooms = 4;
    opts.s4_idle = Duration::ZERO;
    opts.timeout = GUARD;
    for scenario in [Scenario::S1, Scenario::S2, Scenario::S3, Scenario::S4] {
        let report = guard(run(scenario, &opts)).await.expect("scenario");
        println!("{report}");
        assert!(report.rows.len() >= 3, "{scenario:?}: {report}");
    }
    let report = run(Scenario::S2, &opts).await.expect("s2");
    assert!(report.to_string().contains("R=3 delivered"));
    opts.s1_full_clients = true;
    let report = guard(run(Scenario::S1, &opts))
        .await
        .expect("s1 full clients");
    assert!(report.to_string().contains("full clients"), "{report}");
    server.stop().await;
}
