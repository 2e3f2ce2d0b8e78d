//! The generations a channel's targets keep (atomic publish): listed for `mirrorctl
//! generations` and the dashboard, and the one a rollback goes back to.

use std::time::Duration;

use cms_mirror::config::{ChannelConfig, TargetConfig};
use cms_mirror::pb;
use cms_mirror::pb::target_service_client::TargetServiceClient;

/// How long one target may take to list its generations.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// One target's generations, or why they could not be listed.
pub async fn list_target(t: &TargetConfig) -> pb::TargetGenerations {
    let mut out = pb::TargetGenerations {
        target: t.name.clone(),
        ..Default::default()
    };
    let channel = match t.auth.channel(&t.url) {
        Ok(c) => c,
        Err(e) => {
            out.error = e.to_string();
            return out;
        }
    };
    let req = pb::ListSiteGenerationsRequest {
        site: t.site.clone(),
        protocol_version: cms_mirror::PROTOCOL_VERSION,
    };
    let mut client = TargetServiceClient::new(channel);
    match tokio::time::timeout(LIST_TIMEOUT, client.list_generations(req)).await {
        Err(_) => out.error = format!("no answer within {}s", LIST_TIMEOUT.as_secs()),
        Ok(Err(s)) => out.error = crate::runner::status_text(&s),
        Ok(Ok(r)) => out.generations = r.into_inner().generations,
    }
    out
}

/// Every target's generations, in the channel's order.
pub async fn list_all(ch: &ChannelConfig) -> Vec<pb::TargetGenerations> {
    futures::future::join_all(ch.targets.iter().map(list_target)).await
}

/// The generation a rollback without a number goes back to: the newest that every
/// target keeps, older than what any of them serves.
pub fn previous(all: &[pb::TargetGenerations]) -> Result<u64, String> {
    if let Some(t) = all.iter().find(|t| !t.error.is_empty()) {
        return Err(format!(
            "cannot list the generations of target {}: {}",
            t.target, t.error
        ));
    }
    let live = all
        .iter()
        .map(|t| t.generations.iter().find(|g| g.live).map(|g| g.number))
        .collect::<Option<Vec<u64>>>()
        .ok_or("a target serves no generation yet (nothing was published atomically)")?;
    let below = live.into_iter().min().unwrap_or(0);
    let kept_by_all = |n: u64| {
        all.iter()
            .all(|t| t.generations.iter().any(|g| g.number == n))
    };
    all.first()
        .into_iter()
        .flat_map(|t| t.generations.iter().map(|g| g.number))
        .filter(|n| *n < below && kept_by_all(*n))
        .max()
        .ok_or_else(|| {
            format!("no generation before {below} is kept by every target (keep_generations)")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str, numbers: &[u64], live: u64) -> pb::TargetGenerations {
        pb::TargetGenerations {
            target: name.into(),
            error: String::new(),
            generations: numbers
                .iter()
                .map(|n| pb::Generation {
                    number: *n,
                    live: *n == live,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn the_previous_generation_is_the_newest_every_target_keeps_below_the_live_ones() {
        let a = target("a", &[4, 3, 2], 4);
        let b = target("b", &[4, 2], 4);
        assert_eq!(previous(&[a.clone(), b]), Ok(2));
        // A target that serves an older one bounds it.
        let c = target("c", &[3, 2, 1], 3);
        assert_eq!(previous(&[a.clone(), c]), Ok(2));
        assert!(previous(&[target("d", &[5], 5)]).is_err());
        let mut broken = a;
        broken.error = "unreachable".into();
        assert!(previous(&[broken]).unwrap_err().contains("unreachable"));
    }
}
