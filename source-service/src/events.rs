//! Job events: stored first (with their per-job sequence number), then broadcast to
//! live watchers. A watcher subscribes before it replays, so replay and live events
//! join without a gap; a watcher that falls behind catches up from the store.

use serde_json::Value;
use tokio::sync::broadcast;

use cms_mirror::db::Backend;
use cms_mirror::jobstore::{EVENTS_CHANNEL, EventRow, JobStore};

/// Capacity of the live channel; a subscriber further behind catches up from the store.
const LIVE_CAPACITY: usize = 4096;

#[derive(Clone)]
pub struct EventBus {
    store: JobStore,
    live: broadcast::Sender<EventRow>,
}

impl EventBus {
    pub fn new(store: JobStore) -> EventBus {
        EventBus {
            store,
            live: broadcast::channel(LIVE_CAPACITY).0,
        }
    }

    /// Stores and publishes an event. A store failure is logged: monitoring never stops a
    /// job, but the event is then missing from the replay.
    pub async fn emit(&self, job: &str, kind: &str, target: &str, data: Value) -> Option<EventRow> {
        match self.store.append_event(job, kind, target, &data).await {
            Ok(ev) => {
                let _ = self.live.send(ev.clone());
                Some(ev)
            }
            Err(e) => {
                tracing::error!(job, kind, error = %e, "cannot store job event");
                None
            }
        }
    }

    /// On PostgreSQL, follows the events other instances store (LISTEN on
    /// [`EVENTS_CHANNEL`]) and publishes them here, so a watcher connected to this instance
    /// sees jobs that another instance runs. Reconnects on its own; watchers of one job
    /// also poll the store, so an event missed while reconnecting is still delivered.
    pub fn follow_other_instances(&self, instance: String) {
        let db = self.store.db();
        if db.backend != Backend::Postgres {
            return;
        }
        let url = db.url.clone();
        let (store, live) = (self.store.clone(), self.live.clone());
        tokio::spawn(async move {
            loop {
                let res: Result<(), sqlx::Error> = async {
                    let mut l = sqlx::postgres::PgListener::connect(url.expose()).await?;
                    l.listen(EVENTS_CHANNEL).await?;
                    loop {
                        let n = l.recv().await?;
                        let Some((origin, id)) = n.payload().split_once(' ') else {
                            continue;
                        };
                        if origin == instance {
                            continue; // published locally already
                        }
                        let Ok(id) = id.parse::<i64>() else { continue };
                        if let Ok(Some(ev)) = store.event_by_id(id).await {
                            let _ = live.send(ev);
                        }
                    }
                }
                .await;
                if let Err(e) = res {
                    tracing::warn!(error = %e, "event notifications from other instances interrupted; reconnecting");
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<EventRow> {
        self.live.subscribe()
    }

    pub fn subscribers(&self) -> usize {
        self.live.receiver_count()
    }
}
