//! Retrying calls to a target: exponential backoff with jitter within a channel's
//! `retry_budget`, cut short by a cancel; and a deadline for a peer that stops answering.

use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tonic::Code;

/// Sleeps for `d`; false when the job was cancelled meanwhile.
pub(super) async fn wait_unless_cancelled(d: Duration, cancel: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = cancel.changed() => {}
    }
    !*cancel.borrow()
}

/// The wait before attempt `attempt` (1, 2, ...): 200 ms doubling to 10 s, half of it
/// random so that targets cut off together do not come back together.
pub(super) fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(6)).min(10_000);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base / 2))
}

/// Why a retried call gave up.
pub(super) enum GaveUp<E> {
    /// It failed for good, or its transient failures used up the budget.
    Failed(E),
    Cancelled,
}

/// Calls `op` until it succeeds, a failure that `transient` does not accept, more than
/// `budget` consecutive transient failures, or a cancel; `before_retry` hears of each
/// transient failure (attempt number, error) before the backoff. (Boxed futures: the
/// job's future must stay `Send`, which async closures do not yet allow here.)
pub(super) async fn retrying<'a, T, E>(
    budget: u32,
    cancel: &mut watch::Receiver<bool>,
    mut op: impl FnMut() -> BoxFuture<'a, Result<T, E>>,
    transient: impl Fn(&E) -> bool,
    mut before_retry: impl FnMut(u32, &E) -> BoxFuture<'a, ()>,
) -> Result<T, GaveUp<E>> {
    let mut failures = 0u32;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && failures < budget => {
                failures += 1;
                before_retry(failures, &e).await;
                if !wait_unless_cancelled(backoff(failures), cancel).await {
                    return Err(GaveUp::Cancelled);
                }
            }
            Err(e) => return Err(GaveUp::Failed(e)),
        }
    }
}

/// `f`, or DEADLINE_EXCEEDED when the peer does not answer within `d` (a stopped
/// process accepts connections but never answers).
pub(super) async fn within<T>(
    d: Duration,
    f: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(d, f).await.unwrap_or_else(|_| {
        Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {}s",
            d.as_secs()
        )))
    })
}

/// Whether a failed call may succeed if made again (the target restarting, a cut,
/// a hung peer).
pub(super) fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Cancelled
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet<'a>(_: u32, _: &&str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_call_stops_at_its_budget_or_a_cancel() {
        let (tx, mut cancel) = watch::channel(false);
        let calls = std::sync::atomic::AtomicU32::new(0);
        let heard = std::sync::Mutex::new(Vec::new());
        let count = || calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let r: Result<(), GaveUp<&str>> = retrying(
            3,
            &mut cancel,
            || {
                count();
                Box::pin(async { Err("down") })
            },
            |_| true,
            |n, _| {
                heard.lock().unwrap().push(n);
                Box::pin(async {})
            },
        )
        .await;
        assert!(matches!(r, Err(GaveUp::Failed("down"))));
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "one call and three retries"
        );
        assert_eq!(*heard.lock().unwrap(), vec![1, 2, 3]);

        calls.store(0, std::sync::atomic::Ordering::SeqCst);
        let r: Result<u32, GaveUp<&str>> = retrying(
            3,
            &mut cancel,
            || {
                let n = count();
                Box::pin(async move { if n < 3 { Err("down") } else { Ok(n) } })
            },
            |_| true,
            quiet,
        )
        .await;
        assert!(matches!(r, Ok(3)), "a transient failure is tried again");

        let r: Result<(), GaveUp<&str>> = retrying(
            3,
            &mut cancel,
            || Box::pin(async { Err("refused") }),
            |_| false,
            quiet,
        )
        .await;
        assert!(
            matches!(r, Err(GaveUp::Failed("refused"))),
            "a lasting failure is not retried"
        );

        tx.send_replace(true);
        let r: Result<(), GaveUp<&str>> = retrying(
            3,
            &mut cancel,
            || Box::pin(async { Err("down") }),
            |_| true,
            quiet,
        )
        .await;
        assert!(
            matches!(r, Err(GaveUp::Cancelled)),
            "a cancel ends the backoff"
        );
    }
}
