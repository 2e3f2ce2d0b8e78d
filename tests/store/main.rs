//! The store suite: the same tests on SQLite and on PostgreSQL (`TEST_DATABASE_URL`;
//! CI sets it), one named test per backend. Every test gets its own database.

#[path = "../common/postgres.rs"]
mod test_postgres;

use cms_mirror::db::{self, Db, Schema};
use cms_mirror::jobstore::{
    JobOptions, JobState, JobStore, NewItemError, NewJob, Progress, Sent, StoreError,
};
use cms_mirror::model::{ChangeAction, Item, Kind};
use mirror_target::ledger::{Ledger, PackageChanges, SessionStatus};

/// The backends the suite runs on; each test runs once per backend, as its own named
/// test (`sqlite::NAME`, `postgres::NAME`).
#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// The suite's tests, once per backend. PostgreSQL is `TEST_DATABASE_URL` (`.ci/run`
/// sets it); without it those tests are ignored with the reason, and under CI they fail.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                #[cfg_attr(
                    not(any(ci, test_database)),
                    ignore = "needs PostgreSQL: set TEST_DATABASE_URL (.ci/run does)"
                )]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
    };
}

on_every_backend!(
    jobs_are_created_coalesced_claimed_and_finished,
    an_expired_lease_is_taken_over_and_cancel_works,
    checkpoints_counters_events_and_item_errors,
    the_target_ledger_and_manifest_index,
    idle_sessions_expire_and_open_again_from_the_start,
    pages_are_stored_with_their_package,
    page_urls_follow_moves_and_problems_are_reported,
    a_ledger_of_the_first_schema_is_carried_over,
    jobs_are_found_by_id_prefix_and_old_finished_jobs_pruned,
    publish_decisions_number_generations_once,
    a_generation_s_rows_are_copied_whole_in_batches,
);

async fn a_generation_s_rows_are_copied_whole_in_batches(b: Backend) {
    let (backend, db, _keep) = database(b, Schema::Target).await;
    // More rows than one batch of the copy holds, twice over.
    let n = 45_001;
    let (entries, links) = match b {
        Backend::Sqlite => (
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $1) \
             INSERT INTO entries (site, sort_key, path, kind, size, mtime_ns, mode) \
             SELECT 'www', CAST(printf('%06d', i) AS BLOB), printf('%06d', i), 1, i, 0, 420 FROM n",
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $1) \
             INSERT INTO page_links (site, from_key, to_key) \
             SELECT 'www', printf('en/%06d', i / 2), printf('en/%06d', i) FROM n",
        ),
        Backend::Postgres => (
            "INSERT INTO entries (site, sort_key, path, kind, size, mtime_ns, mode) \
             SELECT 'www', convert_to(lpad(i::text, 6, '0'), 'UTF8'), lpad(i::text, 6, '0'), 1, i, 0, 420 \
             FROM generate_series(1, $1::bigint) AS i",
            "INSERT INTO page_links (site, from_key, to_key) \
             SELECT 'www', 'en/' || lpad((i / 2)::text, 6, '0'), 'en/' || lpad(i::text, 6, '0') \
             FROM generate_series(1, $1::bigint) AS i",
        ),
    };
    for sql in [entries, links] {
        sqlx::query(sql).bind(n).execute(&db.pool).await.unwrap();
    }
    let mut tx = db.pool.begin().await.unwrap();
    mirror_target::generations::copy_store(&mut tx, "www", "www@1")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let count = |table: &'static str, site: &'static str| {
        let db = db.clone();
        async move {
            let (c,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM {table} WHERE site = '{site}'"
            )))
            .fetch_one(&db.pool)
            .await
            .unwrap();
            c
        }
    };
    for table in ["entries", "page_links"] {
        assert_eq!(count(table, "www@1").await, n, "{backend}: {table}");
        assert_eq!(count(table, "www").await, n, "{backend}: {table}");
    }
    let (sum,): (i64,) =
        sqlx::query_as("SELECT CAST(SUM(size) AS BIGINT) FROM entries WHERE site = 'www@1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(sum, n * (n + 1) / 2, "{backend}: every row once");
}

async fn publish_decisions_number_generations_once(b: Backend) {
    let (backend, db, _keep) = database(b, Schema::Source).await;
    let s = JobStore::new(db);
    assert_eq!(s.decision("j1").await.unwrap(), None, "{backend}");
    // The first decision of a channel: above what the targets have.
    assert_eq!(
        s.decide_switch("j1", "site", 4).await.unwrap(),
        5,
        "{backend}"
    );
    // A decision stands: deciding again answers the number recorded.
    assert_eq!(
        s.decide_switch("j1", "site", 9).await.unwrap(),
        5,
        "{backend}"
    );
    assert_eq!(s.decision("j1").await.unwrap(), Some(5), "{backend}");
    // The next job of the channel: above its earlier decisions even when the targets
    // say less (a target added since), and channels number on their own.
    assert_eq!(
        s.decide_switch("j2", "site", 1).await.unwrap(),
        6,
        "{backend}"
    );
    assert_eq!(
        s.decide_switch("j3", "other", 0).await.unwrap(),
        1,
        "{backend}"
    );
}

/// A fresh database of `backend`, migrated for `schema`; its backend's name for messages,
/// and the directory to keep while it is used.
async fn database(backend: Backend, schema: Schema) -> (String, Db, Option<tempfile::TempDir>) {
    let (name, url, dir) = empty_database(backend).await;
    (name, db::connect(&url, schema).await.unwrap(), dir)
}

/// The URL of a fresh, empty database (nothing migrated) of `backend`.
async fn empty_database(backend: Backend) -> (String, String, Option<tempfile::TempDir>) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("store.db").display());
            ("sqlite".to_string(), url, Some(dir))
        }
        Backend::Postgres => (
            "postgres".to_string(),
            test_postgres::fresh_database().await,
            None,
        ),
    }
}

async fn jobs_are_found_by_id_prefix_and_old_finished_jobs_pruned(b: Backend) {
    let (backend, db, _keep) = database(b, Schema::Source).await;
    let s = JobStore::new(db);
    // Seventeen ids: two of them share a first hex digit.
    let mut ids = Vec::new();
    for i in 0..17 {
        ids.push(s.create_job(new_job(&format!("c{i}"))).await.unwrap().0.id);
    }
    let id = &ids[0];
    assert_eq!(&s.resolve_job_id(id).await.unwrap(), id, "{backend}");
    assert_eq!(&s.resolve_job_id(&id[..8]).await.unwrap(), id, "{backend}");
    assert_eq!(
        &s.resolve_job_id(&id[..8].to_uppercase()).await.unwrap(),
        id,
        "{backend}"
    );
    let shared = ids
        .iter()
        .find(|a| ids.iter().filter(|b| b[..1] == a[..1]).count() > 1)
        .unwrap();
    let e = s
        .resolve_job_id(&shared[..1])
        .await
        .unwrap_err()
        .to_string();
    // The answer names a few of the ids that share the prefix (not necessarily this one
    // when more than a few do), and no other.
    let named: Vec<&String> = ids.iter().filter(|i| e.contains(i.as_str())).collect();
    assert!(
        e.contains("ambiguous") && !named.is_empty() && named.iter().all(|i| i[..1] == shared[..1]),
        "{backend}: {e}"
    );
    for bad in ["", "zz", "%", "_", "a%"] {
        assert!(
            matches!(s.resolve_job_id(bad).await, Err(StoreError::NotFound(_))),
            "{backend}: {bad:?}"
        );
    }
    // Pruning takes finished jobs older than the cut, with their rows, and nothing else.
    let done = s.claim_next("i1", 60_000).await.unwrap().unwrap().id;
    s.finish_job(&done, JobState::Succeeded, None, "ok")
        .await
        .unwrap();
    let running = s.claim_next("i1", 60_000).await.unwrap().unwrap().id;
    let cut = cms_mirror::now_ms() + 1;
    assert!(
        s.prune_finished(0, 100).await.unwrap().is_empty(),
        "{backend}"
    );
    assert_eq!(
        s.prune_finished(cut, 100).await.unwrap(),
        vec![done.clone()],
        "{backend}"
    );
    assert!(
        matches!(s.get_job(&done).await, Err(StoreError::NotFound(_))),
        "{backend}"
    );
    assert!(s.targets(&done).await.unwrap().is_empty(), "{backend}");
    assert_eq!(
        s.get_job(&running).await.unwrap().state(),
        JobState::Running,
        "{backend}"
    );
    assert_eq!(s.list_jobs(None, 100).await.unwrap().len(), 16, "{backend}");
}

fn new_job(channel: &str) -> NewJob {
    NewJob {
        channel: channel.into(),
        trigger: "admin".into(),
        requested_by: "tester".into(),
        options: JobOptions::default(),
        targets: vec![
            ("web1".into(), "http://127.0.0.1:1".into(), "main".into()),
            ("web2".into(), "http://127.0.0.1:2".into(), "main".into()),
        ],
    }
}

async fn jobs_are_created_coalesced_claimed_and_finished(b: Backend) {
    let (backend, db, _keep) = database(b, Schema::Source).await;
    {
        let s = JobStore::new(db);
        let (a, coalesced) = s.create_job(new_job("site")).await.unwrap();
        assert!(!coalesced, "{backend}");
        assert_eq!(a.state(), JobState::Queued);
        // A second request with the same options folds into the queued job.
        let (a2, coalesced) = s.create_job(new_job("site")).await.unwrap();
        assert!(coalesced && a2.id == a.id, "{backend}");
        let (b, _) = s.create_job(new_job("other")).await.unwrap();
        assert_eq!(s.targets(&a.id).await.unwrap().len(), 2);

        let c1 = s
            .claim_next("i1", 60_000)
            .await
            .unwrap()
            .expect("a job to claim");
        assert_eq!(c1.id, a.id, "{backend}: oldest first");
        assert_eq!(c1.lease_owner.as_deref(), Some("i1"));
        // A channel never runs two jobs: a new job of `site` waits, `other` is next.
        let (a3, coalesced) = s.create_job(new_job("site")).await.unwrap();
        assert!(!coalesced);
        let c2 = s.claim_next("i2", 60_000).await.unwrap().unwrap();
        assert_eq!(c2.id, b.id, "{backend}");
        assert!(
            s.claim_next("i2", 60_000).await.unwrap().is_none(),
            "{backend}: a3 must wait"
        );
        assert!(s.renew_lease(&a.id, "i1", 60_000).await.unwrap());
        assert!(
            !s.renew_lease(&a.id, "i2", 60_000).await.unwrap(),
            "{backend}: not i2's lease"
        );
        s.finish_job(&a.id, JobState::Succeeded, None, "done")
            .await
            .unwrap();
        let c3 = s.claim_next("i1", 60_000).await.unwrap().unwrap();
        assert_eq!(c3.id, a3.id);
        let done = s.get_job(&a.id).await.unwrap();
        assert_eq!(
            (done.state(), done.summary.as_deref(), done.lease_owner),
            (JobState::Succeeded, Some("done"), None)
        );
        assert_eq!(s.list_jobs(Some("site"), 10).await.unwrap().len(), 2);
        assert!(matches!(
            s.get_job("nope").await,
            Err(cms_mirror::jobstore::StoreError::NotFound(_))
        ));
    }
}

async fn an_expired_lease_is_taken_over_and_cancel_works(b: Backend) {
    let (backend, db, _keep) = database(b, Schema::Source).await;
    {
        let s = JobStore::new(db);
        let (a, _) = s.create_job(new_job("site")).await.unwrap();
        s.claim_next("dead", 1).await.unwrap().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let taken = s
            .claim_next("alive", 60_000)
            .await
            .unwrap()
            .expect("expired lease taken over");
        assert_eq!(
            (taken.id.as_str(), taken.lease_owner.as_deref()),
            (a.id.as_str(), Some("alive")),
            "{backend}"
        );
        assert!(
            !s.request_cancel(&a.id).await.unwrap(),
            "running job: flag only"
        );
        assert_eq!(s.get_job(&a.id).await.unwrap().cancel_requested, 1);
        let (q, _) = s.create_job(new_job("other")).await.unwrap();
        assert!(
            s.request_cancel(&q.id).await.unwrap(),
            "queued job: cancelled at once"
        );
        assert_eq!(s.get_job(&q.id).await.unwrap().state(), JobState::Cancelled);
    }
}

async fn checkpoints_counters_events_and_item_errors(b: Backend) {
    let (backend, db, _keep) = database(b, Schema::Source).await;
    {
        let s = JobStore::new(db);
        let (a, _) = s.create_job(new_job("site")).await.unwrap();
        s.set_planned(&a.id, "web1", 10, 1000, 2, 0).await.unwrap();
        let p = Progress {
            items: 4,
            bytes: 400,
            deletes: 0,
            packages_acked: 1,
            item_errors: 1,
            sent: Sent {
                packages: 1,
                wire_bytes: 450,
                max_seq: 3,
                ..Sent::default()
            },
        };
        s.checkpoint(&a.id, "web1", 1, r#"{"pos":10}"#, &p)
            .await
            .unwrap();
        s.checkpoint(&a.id, "web1", 2, r#"{"pos":20}"#, &p)
            .await
            .unwrap();
        let resent = Sent {
            packages: 2,
            wire_bytes: 900,
            retried: 1,
            max_seq: 2,
            reconnects: 1,
        };
        s.add_sent(&a.id, "web1", &resent).await.unwrap();
        let t = s
            .targets(&a.id)
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.target == "web1")
            .unwrap();
        assert_eq!(
            (
                t.items_total,
                t.items_done,
                t.bytes_done,
                t.packages_acked,
                t.item_errors
            ),
            (10, 8, 800, 2, 2),
            "{backend}"
        );
        assert_eq!(
            (
                t.checkpoint_seq,
                t.checkpoint_json.as_str(),
                t.packages_sent,
                t.bytes_on_wire
            ),
            (2, r#"{"pos":20}"#, 4, 1800)
        );
        // The highest package number sent stays the highest (3, not the later 2).
        assert_eq!(
            (t.packages_retried, t.max_sent_seq, t.reconnects),
            (1, 3, 1),
            "{backend}"
        );
        s.add_item_errors(
            &a.id,
            "web1",
            &[NewItemError {
                path: "a/b".into(),
                code: "unreadable".into(),
                message: "permission denied".into(),
                retryable: false,
            }],
        )
        .await
        .unwrap();
        let errs = s.item_errors(&a.id).await.unwrap();
        assert_eq!(
            (errs.len(), errs[0].path.as_str(), errs[0].retryable),
            (1, "a/b", 0)
        );

        // Events: per-job sequence without gaps, even when written concurrently.
        let mut tasks = Vec::new();
        for i in 0..20 {
            let s = s.clone();
            let id = a.id.clone();
            tasks.push(tokio::spawn(async move {
                s.append_event(&id, "progress", "web1", &serde_json::json!({"i": i}))
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let evs = s.events_of_job(&a.id, 0).await.unwrap();
        assert_eq!(
            evs.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>(),
            "{backend}"
        );
        assert_eq!(s.events_of_job(&a.id, 15).await.unwrap().len(), 5);
        let all = s.events_after(Some("site"), evs[9].id, 100).await.unwrap();
        assert_eq!(all.len(), 10);
        assert!(
            s.events_after(Some("other"), 0, 100)
                .await
                .unwrap()
                .is_empty()
        );

        s.record_success("site", "web1", &a.id, 1234).await.unwrap();
        s.record_success("site", "web1", &a.id, 5678).await.unwrap();
        let st = s.channel_states().await.unwrap();
        assert_eq!((st.len(), st[0].last_success_at), (1, Some(5678)));
        assert_eq!(s.init_setting("offset", "7").await.unwrap(), "7");
        assert_eq!(
            s.init_setting("offset", "9").await.unwrap(),
            "7",
            "{backend}: a stored setting is kept"
        );
    }
}

fn item(path: &str, kind: Kind) -> Item {
    Item {
        path: path.into(),
        kind,
        size: 3,
        mtime_ns: 42,
        mode: 0o644,
        link: String::new(),
        hash: Some(blake3::hash(b"abc").to_hex().to_string()),
    }
}

async fn the_target_ledger_and_manifest_index(b: Backend) {
    let (backend, db, _keep) = database(b, Schema::Target).await;
    {
        let l = Ledger::new(db);
        let (s, expired) = l.open_session("job1", "main", "site", "").await.unwrap();
        assert_eq!((s.last_seq, s.state.as_str(), expired), (0, "open", false));
        let ch = PackageChanges {
            upserts: vec![
                item("a", Kind::Dir),
                item("a/b", Kind::File),
                item("a-c", Kind::File),
                item("a/b/x", Kind::File),
            ],
            deletes: vec![],
            touched_dirs: vec!["a".into()],
            changes: vec![
                ("a".into(), ChangeAction::Created),
                ("a/b".into(), ChangeAction::Created),
            ],
            ..Default::default()
        };
        l.record_package(&s, 1, b"sum1", &ch).await.unwrap();
        assert_eq!(
            l.applied_checksum(&s.id, 1).await.unwrap().as_deref(),
            Some(&b"sum1"[..])
        );
        assert_eq!(
            l.open_session("job1", "main", "site", "")
                .await
                .unwrap()
                .0
                .last_seq,
            1,
            "{backend}: resume point"
        );
        // Tree order: a, a/b, a/b/x, a-c (not byte order of the full paths).
        let page = l.manifest_page("main", &[], 100).await.unwrap();
        assert_eq!(
            page.iter().map(|i| i.path.as_str()).collect::<Vec<_>>(),
            ["a", "a/b", "a/b/x", "a-c"],
            "{backend}"
        );
        assert_eq!(page[1].hash, item("", Kind::File).hash);
        // Every field comes back as it went in, names that need escaping included, and
        // pages continue after the last key of the one before.
        let odd = vec![
            Item {
                path: "a/b/q\"uote\\back\nline\ttab é☃".into(),
                size: u64::MAX >> 1,
                mtime_ns: -1_500_000_000,
                mode: 0o100755,
                hash: None,
                ..item("", Kind::File)
            },
            Item {
                path: "a/b/link".into(),
                kind: Kind::Symlink,
                size: 0,
                link: "../../x \"y\"".into(),
                hash: None,
                ..item("", Kind::File)
            },
        ];
        let more = PackageChanges {
            upserts: odd.clone(),
            ..Default::default()
        };
        l.record_package(&s, 2, b"sum2", &more).await.unwrap();
        let all = l.manifest_page("main", &[], 100).await.unwrap();
        for o in &odd {
            assert!(all.contains(o), "{backend}: {o:?} not in {all:?}");
        }
        let mut paged = Vec::new();
        let mut after = Vec::new();
        loop {
            let p = l.manifest_page("main", &after, 2).await.unwrap();
            let Some(last) = p.last() else { break };
            assert!(p.len() <= 2);
            after = cms_mirror::model::tree_key(&last.path);
            paged.extend(p);
        }
        assert_eq!(paged, all, "{backend}: pages of two");
        // Deleting a directory removes everything below it (the two above too), and
        // nothing else.
        let del = PackageChanges {
            deletes: vec!["a/b".into()],
            changes: vec![("a/b".into(), ChangeAction::Deleted)],
            ..Default::default()
        };
        l.record_package(&s, 3, b"sum3", &del).await.unwrap();
        let page = l.manifest_page("main", &[], 100).await.unwrap();
        assert_eq!(
            page.iter().map(|i| i.path.as_str()).collect::<Vec<_>>(),
            ["a", "a-c"],
            "{backend}"
        );
        assert_eq!(l.touched_dirs(&s.id, "main").await.unwrap().len(), 1);
        let (c, u, d) = l.commit_session(&s.id, "main").await.unwrap();
        assert_eq!(
            (c, u, d),
            (1, 0, 1),
            "{backend}: a created then deleted, a/b deleted"
        );
        assert!(l.touched_dirs(&s.id, "main").await.unwrap().is_empty());
        assert_eq!(
            l.session(&s.id).await.unwrap().unwrap().state,
            SessionStatus::Committed
        );
    }
}

/// An idle session expires: its applied packages are forgotten and its directories
/// released (and returned), what it applied stays in the index; opened again it starts
/// from package 1 and says so. A session that changed nothing leaves no row.
async fn idle_sessions_expire_and_open_again_from_the_start(b: Backend) {
    let (backend, db, _keep) = database(b, Schema::Target).await;
    let l = Ledger::new(db);
    let (s, _) = l.open_session("job1", "main", "", "").await.unwrap();
    let ch = PackageChanges {
        upserts: vec![item("d", Kind::Dir), item("d/f", Kind::File)],
        touched_dirs: vec!["d".into()],
        changes: vec![("d/f".into(), ChangeAction::Created)],
        ..Default::default()
    };
    l.record_package(&s, 1, b"sum1", &ch).await.unwrap();
    let (empty, _) = l.open_session("job2", "main", "", "").await.unwrap();
    let now = cms_mirror::now_ms();
    // Active since `now - 1`: not idle before then.
    assert!(
        l.idle_sessions(now - 60_000).await.unwrap().is_empty(),
        "{backend}"
    );
    let idle = l.idle_sessions(now + 1).await.unwrap();
    assert_eq!(idle.len(), 2, "{backend}: {idle:?}");
    assert_eq!(
        l.expire_session(&s, now - 60_000).await.unwrap(),
        None,
        "{backend}: still active then"
    );
    let dirs = l
        .expire_session(&s, now + 1)
        .await
        .unwrap()
        .expect("expired");
    assert_eq!(
        dirs.iter().map(|d| d.path.as_str()).collect::<Vec<_>>(),
        ["d"],
        "{backend}"
    );
    assert_eq!(
        l.expire_session(&s, now + 1).await.unwrap(),
        None,
        "{backend}: once"
    );
    assert_eq!(
        l.session(&s.id).await.unwrap().unwrap().state,
        SessionStatus::Expired
    );
    assert!(
        l.touched_dirs(&s.id, "main").await.unwrap().is_empty(),
        "{backend}"
    );
    assert_eq!(
        l.applied_checksum(&s.id, 1).await.unwrap(),
        None,
        "{backend}"
    );
    assert_eq!(
        l.manifest_page("main", &[], 10).await.unwrap().len(),
        2,
        "{backend}: applied stays"
    );
    l.expire_session(&empty, now + 1)
        .await
        .unwrap()
        .expect("expired");
    assert!(
        l.session(&empty.id).await.unwrap().is_none(),
        "{backend}: nothing to keep"
    );
    let (again, expired) = l.open_session("job1", "main", "", "").await.unwrap();
    assert_eq!(
        (again.last_seq, again.state, expired),
        (0, SessionStatus::Open, true),
        "{backend}"
    );
    let (again, expired) = l.open_session("job1", "main", "", "").await.unwrap();
    assert_eq!((again.last_seq, expired), (0, false), "{backend}: once");
    // What it changed before it expired is still reported at its commit.
    assert_eq!(
        l.commit_session(&s.id, "main").await.unwrap(),
        (1, 0, 0),
        "{backend}"
    );
}

/// A page lands in the page store and the manifest index with its package, once however
/// often the package is recorded, and goes with a delete of its key.
async fn pages_are_stored_with_their_package(b: Backend) {
    use cms_mirror::page::PageDoc;
    use mirror_target::pagestore::{self, PageRow};
    let (backend, db, _keep) = database(b, Schema::Target).await;
    let l = Ledger::new(db.clone());
    let (s, _) = l.open_session("job1", "main", "", "").await.unwrap();
    let page = |title: &str| {
        let p: PageDoc = serde_json::from_value(serde_json::json!({
            "key": "en/abc", "locale": "en", "parent": null, "position": "0001",
            "type": "testsite.articlepage", "slug": "news", "title": title, "seo_title": "",
            "search_description": "", "show_in_menus": false, "first_published_at": null,
            "last_published_at": null, "fields": {"body": "<p>x</p>"}, "references": [],
            "source_id": 5
        }))
        .unwrap();
        let doc = p.document();
        PackageChanges {
            upserts: vec![p.item(doc.as_bytes())],
            pages: vec![PageRow::new(p, doc)],
            ..Default::default()
        }
    };
    for seq in [1, 1, 2] {
        l.record_package(&s, seq, b"sum", &page("News"))
            .await
            .unwrap();
    }
    assert_eq!(pagestore::count(&db, "main").await.unwrap(), 1, "{backend}");
    let index = l.manifest_page("main", &[], 10).await.unwrap();
    assert_eq!(index.len(), 1, "{backend}");
    assert_eq!(
        (index[0].path.as_str(), index[0].kind),
        (".cms-mirror-pages/en/abc", Kind::Page)
    );
    l.record_package(&s, 3, b"sum", &page("All the news"))
        .await
        .unwrap();
    let title: (String,) = sqlx::query_as("SELECT title FROM pages WHERE page_key = 'en/abc'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(title.0, "All the news", "{backend}");
    let gone = ".cms-mirror-pages/en/abc".to_string();
    let del = PackageChanges {
        deletes: vec![gone.clone()],
        changes: vec![(gone, ChangeAction::Deleted)],
        ..Default::default()
    };
    l.record_package(&s, 4, b"sum", &del).await.unwrap();
    assert_eq!(pagestore::count(&db, "main").await.unwrap(), 0, "{backend}");
    assert!(
        l.manifest_page("main", &[], 10).await.unwrap().is_empty(),
        "{backend}"
    );
    assert_eq!(
        l.commit_session(&s.id, "main").await.unwrap(),
        (0, 0, 1),
        "{backend}: created, then deleted"
    );
}

/// A test page `key` under `parent` with `slug`, linking to `links`.
fn test_page(
    key: &str,
    parent: Option<&str>,
    slug: &str,
    links: &[&str],
) -> mirror_target::pagestore::PageRow {
    let refs: Vec<serde_json::Value> = links
        .iter()
        .map(|to| serde_json::json!({"path": "body", "kind": "page", "id": 1, "to": to}))
        .collect();
    let p: cms_mirror::page::PageDoc = serde_json::from_value(serde_json::json!({
        "key": key, "locale": "en", "parent": parent, "position": "0001",
        "type": "testsite.articlepage", "slug": slug, "title": slug, "seo_title": "",
        "search_description": "", "show_in_menus": false, "first_published_at": null,
        "last_published_at": null, "fields": {}, "references": refs,
        "source_id": 1
    }))
    .unwrap();
    let doc = p.document();
    mirror_target::pagestore::PageRow::new(p, doc)
}

/// URL paths come from pages_root, locale and slugs, and follow a renamed page to its
/// descendants; a colliding URL, a missing parent and links to pages not mirrored (or
/// deleted) are reported, each naming the page.
async fn page_urls_follow_moves_and_problems_are_reported(b: Backend) {
    use mirror_target::pagestore::Resolver;
    use std::collections::HashSet;
    let (backend, db, _keep) = database(b, Schema::Target).await;
    let l = Ledger::new(db.clone());
    let (s, _) = l.open_session("job1", "main", "", "").await.unwrap();
    let mut seq = 0;
    let mut put = |pages: Vec<mirror_target::pagestore::PageRow>, deletes: Vec<String>| {
        seq += 1;
        let ch = PackageChanges {
            upserts: pages
                .iter()
                .map(|p| Item {
                    kind: Kind::Page,
                    ..item(&p.path(), Kind::File)
                })
                .collect(),
            pages,
            deletes,
            ..Default::default()
        };
        (seq, ch)
    };
    let resolve = |keys: &[&str], deleted: &[&str]| {
        let put: HashSet<String> = keys.iter().map(|k| k.to_string()).collect();
        let deleted: Vec<String> = deleted.iter().map(|k| k.to_string()).collect();
        let db = db.clone();
        async move {
            Resolver {
                site: "main",
                session: "job1",
                root: "/site/",
                put: &put,
                deleted: &deleted,
            }
            .resolve(&db)
            .await
            .unwrap()
        }
    };
    let urls = || {
        let db = db.clone();
        async move {
            let rows: Vec<(String, Option<String>)> =
                sqlx::query_as("SELECT page_key, url_path FROM pages ORDER BY page_key")
                    .fetch_all(&db.pool)
                    .await
                    .unwrap();
            rows
        }
    };
    let (n, ch) = put(
        vec![
            test_page("en/c", Some("en/b"), "c", &[]),
            test_page("en/b", Some("en/a"), "b", &["en/a"]),
            test_page("en/a", None, "news", &[]),
        ],
        vec![],
    );
    l.record_package(&s, n, b"s", &ch).await.unwrap();
    assert!(resolve(&["en/a", "en/b", "en/c"], &[]).await.is_empty());
    let want = |a: &str, b: &str, c: &str| {
        vec![
            ("en/a".to_string(), Some(a.to_string())),
            ("en/b".to_string(), Some(b.to_string())),
            ("en/c".to_string(), Some(c.to_string())),
        ]
    };
    assert_eq!(
        urls().await,
        want("/site/en/news/", "/site/en/news/b/", "/site/en/news/b/c/"),
        "{backend}"
    );
    // A renamed page takes its descendants along.
    let (n, ch) = put(vec![test_page("en/a", None, "latest", &[])], vec![]);
    l.record_package(&s, n, b"s", &ch).await.unwrap();
    assert!(resolve(&["en/a"], &[]).await.is_empty());
    assert_eq!(
        urls().await,
        want(
            "/site/en/latest/",
            "/site/en/latest/b/",
            "/site/en/latest/b/c/"
        ),
        "{backend}"
    );
    // A second page at that URL, an orphan, a link to nowhere.
    let (n, ch) = put(
        vec![
            test_page("en/d", None, "latest", &[]),
            test_page("en/e", Some("en/zzz"), "e", &[]),
            test_page("en/f", None, "f", &["en/nope"]),
        ],
        vec![],
    );
    l.record_package(&s, n, b"s", &ch).await.unwrap();
    let mut errors: Vec<(String, String)> = resolve(&["en/d", "en/e", "en/f"], &[])
        .await
        .into_iter()
        .map(|e| (e.path, e.code))
        .collect();
    errors.sort();
    assert_eq!(
        errors,
        [
            (
                ".cms-mirror-pages/en/d".to_string(),
                "slug_collision".to_string()
            ),
            (
                ".cms-mirror-pages/en/e".to_string(),
                "missing_parent".to_string()
            ),
            (
                ".cms-mirror-pages/en/f".to_string(),
                "broken_link".to_string()
            ),
        ],
        "{backend}"
    );
    // A deleted page leaves the pages linking to it with a broken link.
    let (n, ch) = put(vec![], vec![".cms-mirror-pages/en/a".into()]);
    l.record_package(&s, n, b"s", &ch).await.unwrap();
    let errors = resolve(&[], &["en/a"]).await;
    assert_eq!(errors.len(), 1, "{backend}: {errors:?}");
    assert_eq!(
        (errors[0].path.as_str(), errors[0].code.as_str()),
        (".cms-mirror-pages/en/b", "broken_link")
    );
    assert!(errors[0].message.contains("en/a"), "{}", errors[0].message);
}

/// A ledger written by the first schema keeps its sessions, index and changes through
/// the later migrations (SQLite rebuilds two tables), and the touched-directories
/// index only holds rows of open sessions.
async fn a_ledger_of_the_first_schema_is_carried_over(b: Backend) {
    let (backend, url, _keep) = empty_database(b).await;
    {
        let raw_url = if backend == "sqlite" {
            format!("{url}?mode=rwc")
        } else {
            url.clone()
        };
        let raw = db::connect_raw(&raw_url).await.unwrap();
        let first = if backend == "sqlite" {
            sqlx::migrate!("migrations/target/sqlite")
        } else {
            sqlx::migrate!("migrations/target/postgres")
        };
        first.run_to(1, &raw).await.unwrap();
        for sql in [
            "INSERT INTO sessions (id, job_id, site, state, last_seq, created_at) VALUES ('j/main', 'j', 'main', 'open', 7, 1)",
            "INSERT INTO session_changes (session_id, path, action) VALUES ('j/main', 'a/b', 'created')",
        ] {
            sqlx::query(sql).execute(&raw).await.unwrap();
        }
        for (path, kind, touched) in [("a", Kind::Dir, Some("j/main")), ("a/b", Kind::File, None)] {
            sqlx::query(
                "INSERT INTO entries (site, sort_key, path, kind, size, mtime_ns, mode, touched_session) \
                 VALUES ('main', $1, $2, $3, 3, 42, 420, $4)",
            )
            .bind(cms_mirror::model::tree_key(path))
            .bind(path)
            .bind(kind.code())
            .bind(touched)
            .execute(&raw)
            .await
            .unwrap();
        }
        raw.close().await;

        let l = Ledger::new(db::connect(&url, Schema::Target).await.unwrap());
        assert_eq!(
            l.open_session("j", "main", "", "")
                .await
                .unwrap()
                .0
                .last_seq,
            7,
            "{backend}"
        );
        let page = l.manifest_page("main", &[], 10).await.unwrap();
        assert_eq!(
            page.iter()
                .map(|i| (i.path.as_str(), i.size))
                .collect::<Vec<_>>(),
            [("a", 3), ("a/b", 3)],
            "{backend}"
        );
        assert_eq!(
            l.changes("j/main").await.unwrap(),
            [("a/b".to_string(), ChangeAction::Created)]
        );
        let touched = l.touched_dirs("j/main", "main").await.unwrap();
        assert_eq!(touched.len(), 1, "{backend}");
        assert_eq!(touched[0].path, "a");
        let pool = &l.db().pool;
        if backend == "sqlite" {
            for table in ["entries", "session_changes"] {
                let e = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT rowid FROM {table}")))
                    .execute(pool)
                    .await
                    .expect_err("a WITHOUT ROWID table has no rowid");
                assert!(e.to_string().contains("rowid"), "{table}: {e}");
            }
        }
        let def: (String,) = sqlx::query_as(if backend == "sqlite" {
            "SELECT sql FROM sqlite_master WHERE name = 'entries_touched_idx'"
        } else {
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'entries_touched_idx'"
        })
        .fetch_one(pool)
        .await
        .unwrap();
        assert!(
            def.0.to_lowercase().contains("where") && def.0.contains("IS NOT NULL"),
            "{backend}: {}",
            def.0
        );
    }
}

#[tokio::test]
async fn an_unknown_scheme_or_unreachable_database_is_a_clear_error() {
    let e = db::connect("mysql://u:pw@h/db", Schema::Source)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unsupported database URL mysql://u:***@h/db"),
        "{e}"
    );
    let e = db::connect("postgres://u:secret@127.0.0.1:1/db", Schema::Source)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("postgres://u:***@127.0.0.1:1/db") && !e.contains("secret"),
        "{e}"
    );
}
