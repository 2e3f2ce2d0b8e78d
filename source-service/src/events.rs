//! Job events: stored first (with their per-job sequence number), then broadcast to
//! live watchers. A watcher subscribes before it replays, so replay and live events
//! join without a gap; a watcher that falls behind catches up from the store.

use serde_json::Value;
use tokio::sync::broadcast;

use cms_mirror::jobstore::{EventRow, JobStore};

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

    pub fn subscribe(&self) -> broadcast::Receiver<EventRow> {
        self.live.subscribe()
    }

    pub fn subscribers(&self) -> usize {
        self.live.receiver_count()
    }
}
