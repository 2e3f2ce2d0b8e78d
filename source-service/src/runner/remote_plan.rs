//! Planning against a target: its manifest streamed from the target's index, merged with
//! the source walk by [`crate::plan::build`] on a blocking thread.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use cms_mirror::config::{ChannelConfig, TargetConfig};
use cms_mirror::jobstore::{JobOptions, NewItemError, Progress};
use cms_mirror::model::Item;
use cms_mirror::pb;
use cms_mirror::pb::target_service_client::TargetServiceClient;
use cms_mirror::security::AuthChannel;

use super::retry::{retryable, within};
use super::{logged, record_item_errors, status_text, target_label, traced, walk_error};
use crate::App;
use crate::plan::{self, Compare, ManifestItem, PlanError, PlanSpec};

/// Streams the target's manifest into the planner's channel, in tree order; a broken
/// stream ends with [`PlanError::ManifestBroke`] (retried), a malformed entry with
/// [`PlanError::Fatal`].
async fn feed_manifest(
    mut stream: tonic::Streaming<pb::ManifestBatch>,
    tx: mpsc::Sender<ManifestItem>,
    label: String,
    idle: Duration,
) {
    loop {
        match within(idle, stream.message()).await {
            Ok(Some(batch)) => {
                for e in batch.entries {
                    let item = e.meta.as_ref().and_then(Item::from_pb).ok_or_else(|| {
                        PlanError::Fatal(format!("{label}: malformed manifest entry"))
                    });
                    if tx.send(item).await.is_err() {
                        return;
                    }
                }
            }
            Ok(None) => return,
            Err(s) => {
                let broke = PlanError::ManifestBroke(format!(
                    "manifest stream broke: {label}: {}",
                    status_text(&s)
                ));
                let _ = tx.send(Err(broke)).await;
                return;
            }
        }
    }
}

/// Reads a channel's CMS pages into `tx` (an error to open the CMS database is sent as
/// the feed's first and last message).
async fn read_pages(
    p: cms_mirror::config::PagesConfig,
    tx: mpsc::Sender<Result<cms_mirror::page::PageDoc, cms_mirror::wagtail::WagtailError>>,
) {
    match cms_mirror::wagtail::WagtailDb::open(p.url.expose()).await {
        Ok(w) => w.walk(&p.subtree, tx).await,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
        }
    }
}

/// What the plan of one target compares and covers.
fn spec(ch: &ChannelConfig, opts: &JobOptions) -> PlanSpec {
    PlanSpec {
        source: ch.source.clone(),
        filter: ch.filter.clone(),
        last: ch.last.clone(),
        delete: ch.delete,
        compare: if opts.full {
            Compare::Full
        } else if opts.checksum || ch.checksum {
            Compare::Checksum
        } else {
            Compare::Quick
        },
        paths: opts.paths.clone(),
        delta_min: ch.delta_min_bytes.filter(|_| !opts.full),
    }
}

/// A manifest asked for while the session opens (a round trip each on a far link, and
/// neither needs the other): the plan reads it if the job plans; dropped, the call ends.
pub(super) struct EarlyManifest(Option<tokio::task::JoinHandle<ManifestCall>>);

type ManifestCall = Result<tonic::Streaming<pb::ManifestBatch>, tonic::Status>;

impl EarlyManifest {
    pub(super) fn start(
        client: &TargetServiceClient<AuthChannel>,
        ch: &ChannelConfig,
        t: &TargetConfig,
    ) -> EarlyManifest {
        let (client, ch, t) = (client.clone(), ch.clone(), t.clone());
        EarlyManifest(Some(tokio::spawn(async move {
            open_manifest(&client, &ch, &t).await
        })))
    }

    /// The call's answer: the stream, or why there is none.
    async fn answer(mut self) -> ManifestCall {
        let call = self.0.take().expect("taken only here");
        call.await
            .unwrap_or_else(|e| Err(tonic::Status::internal(e.to_string())))
    }
}

impl Drop for EarlyManifest {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// Asks for the target's manifest of the site (the stream, once it answers).
async fn open_manifest(
    client: &TargetServiceClient<AuthChannel>,
    ch: &ChannelConfig,
    t: &TargetConfig,
) -> ManifestCall {
    let request = pb::GetManifestRequest {
        site: t.site.clone(),
        after_path: String::new(),
    };
    // Compressed: a manifest is mostly paths, and on a slow link the plan waits for it.
    let mut client = client
        .clone()
        .accept_compressed(tonic::codec::CompressionEncoding::Zstd);
    within(ch.ack_timeout, client.get_manifest(traced(request)))
        .await
        .map(|r| r.into_inner())
}

/// Plans one target into `plan_dir`; walk errors become item errors of the job. A
/// transport fault ([`PlanError::ManifestBroke`]) is the caller's to retry. Reads the
/// manifest `early` asked for, if given.
#[allow(clippy::too_many_arguments)]
pub(super) async fn make_plan(
    app: &Arc<App>,
    client: &TargetServiceClient<AuthChannel>,
    ch: &ChannelConfig,
    t: &TargetConfig,
    opts: &JobOptions,
    plan_dir: &Path,
    jid: &str,
    early: Option<EarlyManifest>,
) -> Result<plan::Totals, PlanError> {
    let opened = match early {
        Some(e) => e.answer().await,
        None => open_manifest(client, ch, t).await,
    };
    let stream = opened.map_err(|s| {
        let msg = format!(
            "{}: cannot read its manifest: {}",
            target_label(t),
            status_text(&s)
        );
        if retryable(&s) {
            PlanError::ManifestBroke(msg)
        } else {
            PlanError::Fatal(msg)
        }
    })?;
    let (mtx, mut mrx) = mpsc::channel::<ManifestItem>(4096);
    let feeder = tokio::spawn(feed_manifest(stream, mtx, target_label(t), ch.ack_timeout));
    // A job naming paths reads only the pages it names (URL paths), if any.
    let page_paths: Vec<String> = opts
        .paths
        .iter()
        .filter(|p| p.starts_with('/'))
        .cloned()
        .collect();
    let read = opts.paths.is_empty() || !page_paths.is_empty();
    let (pages, reader) = match &ch.pages {
        Some(p) if read => {
            let mut p = p.clone();
            p.subtree.only = page_paths;
            let (ptx, prx) = mpsc::channel(256);
            let reader = tokio::spawn(read_pages(p, ptx));
            (Some(prx), Some(reader))
        }
        _ => (None, None),
    };
    let spec = spec(ch, opts);
    let dir = plan_dir.to_path_buf();
    let built =
        tokio::task::spawn_blocking(move || plan::build(&spec, &mut mrx, pages, &dir)).await;
    feeder.abort();
    if let Some(r) = reader {
        r.abort();
    }
    let (totals, walk_errors) =
        built.map_err(|e| PlanError::Fatal(format!("planner failed: {e}")))??;
    if !walk_errors.is_empty() {
        let errs: Vec<NewItemError> = walk_errors.into_iter().map(walk_error).collect();
        record_item_errors(app, jid, &ch.name, &t.name, &errs).await;
        let p = Progress {
            item_errors: errs.len() as i64,
            ..Default::default()
        };
        logged(
            app.store.checkpoint(jid, &t.name, 0, "", &p).await,
            jid,
            "walk error counts",
        );
    }
    Ok(totals)
}
