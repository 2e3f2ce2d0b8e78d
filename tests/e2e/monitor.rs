//! Issue 5: watching jobs (replay then live without a gap, slow subscribers).

use std::time::Duration;

use cms_mirror::pb;
use cms_mirror::pb::source_service_client::SourceServiceClient;

use crate::helpers::*;

#[test]
fn a_watch_started_mid_job_is_one_gap_free_sequence_to_finished() {
    let Mirror {
        tmp: _tmp,
        src,
        dst: _dst,
        config: _config,
        target: _target,
        source,
    } = Mirror::start(
        |src| make_many(src, 3000),
        "package_bytes = 16384\nwindow = 2",
    );
    let out = mirrorctl(&source.url(), &["start", "site"]);
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // Wait until the job is under way, so the watch sees a replay and then live events.
    let j = wait_until(Duration::from_secs(60), || {
        let j = show_job(&source.url(), &job);
        let acked = j["targets"][0]["packages_acked"].as_u64().unwrap_or(0);
        ready(acked >= 2, || format!("job not under way: {j:#}")).map(|()| j)
    });
    assert_eq!(j["state"], "running");
    let out = mirrorctl(&source.url(), &["watch", &job, "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let evs: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=evs.len() as u64).collect::<Vec<_>>(),
        "gap or duplicate"
    );
    assert_eq!(evs.last().unwrap()["kind"], "finished");
    let planned = evs.iter().find(|e| e["kind"] == "planned").unwrap();
    let last_progress = evs.iter().rev().find(|e| e["kind"] == "progress").unwrap();
    assert_eq!(
        last_progress["data"]["items_done"],
        planned["data"]["items_total"]
    );
    assert_eq!(
        last_progress["data"]["bytes_done"],
        planned["data"]["bytes_total"]
    );
    assert_eq!(
        planned["data"]["items_total"].as_u64().unwrap(),
        snapshot(&src).len() as u64
    );
    assert!(
        evs.iter().filter(|e| e["kind"] == "progress").count() >= 2,
        "progress is reported along the way"
    );
}

#[test]
fn a_stalled_subscriber_does_not_hold_the_job_back() {
    let Mirror {
        tmp: _tmp,
        src,
        dst,
        config: _config,
        target: _target,
        source,
    } = Mirror::start(|src| make_many(src, 1500), "package_bytes = 8192");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = SourceServiceClient::connect(source.url()).await.unwrap();
        // A subscriber to all jobs that reads nothing while the job runs.
        let mut stalled = c
            .watch_jobs(pb::WatchJobsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let id = c
            .start_job(pb::StartJobRequest {
                channel: "site".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .job_id;
        let j = wait_for(Duration::from_secs(120), || {
            let mut c = c.clone();
            let id = id.clone();
            async move {
                let j = c.get_job(pb::GetJobRequest { job_id: id }).await.unwrap();
                let j = j.into_inner();
                ready(!j.finished_at.is_empty(), || {
                    "the job did not finish while a subscriber stalled".to_string()
                })
                .map(|()| j)
            }
        })
        .await;
        assert_eq!(j.state, pb::JobState::Succeeded as i32);
        // Now the subscriber reads: it ends with the job's final state.
        let mut last = None;
        while let Ok(Ok(Some(e))) =
            tokio::time::timeout(Duration::from_secs(5), stalled.message()).await
        {
            let done = e.kind == "finished" && e.job_id == id;
            last = Some(e);
            if done {
                break;
            }
        }
        let last = last.expect("events");
        assert_eq!(last.kind, "finished");
        let d: serde_json::Value = serde_json::from_str(&last.data_json).unwrap();
        assert_eq!(d["state"], "succeeded");
    });
    assert_same_tree(&src, &dst);
}

#[test]
fn watching_an_unknown_job_is_not_found() {
    let Mirror {
        tmp: _tmp,
        src: _src,
        dst: _dst,
        config: _config,
        target: _target,
        source,
    } = Mirror::start(make_tree, "");
    let out = mirrorctl(&source.url(), &["watch", "0000-nope"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
    assert!(err.contains("0000-nope"), "{err}");
}
