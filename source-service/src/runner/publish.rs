//! The two phases of an atomic job across its targets. Each target votes once: prepared
//! (its generation whole and durable), or not (with why). Once every target has voted
//! the job decides: all prepared, the decision to switch is recorded in the job store
//! (with the generation's number) before any target is told; otherwise no target
//! switches. A source that restarts between the phases finds the recorded decision and
//! tells the targets the same; without one, it prepares again and decides then.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

/// What every target of an atomic job is told after the vote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// Serve the prepared generation, as this number.
    Switch(u64),
    /// Nothing changed on any target: the live generation stays, no target switches.
    Keep,
    /// Keep serving the previous generation: why.
    Abort(String),
}

/// A target's vote for the switch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Prepared {
    /// The highest generation number the target has.
    pub(super) last_generation: u64,
    /// Its new generation is its live one (nothing changed).
    pub(super) unchanged: bool,
}

#[derive(Default)]
struct Votes {
    /// Target name -> prepared, or why it did not prepare.
    cast: HashMap<String, Result<Prepared, String>>,
}

pub(super) struct Coordinator {
    targets: usize,
    /// A rollback job: the generation every target goes back to.
    rollback_to: Option<u64>,
    votes: Mutex<Votes>,
    all_voted: watch::Sender<bool>,
    decided: watch::Sender<Option<Decision>>,
}

/// The outcome of the vote, once every target has cast one.
pub(super) struct Tally {
    /// The highest generation number any target has.
    pub(super) max_generation: u64,
    /// Why targets did not prepare, sorted.
    pub(super) refused: Vec<String>,
    /// Every target prepared and none changed anything.
    pub(super) unchanged: bool,
}

impl Coordinator {
    /// A vote of `targets` targets; `recorded`, the decision a run before this one
    /// recorded (every target is then told at once).
    pub(super) fn new(targets: usize, recorded: Option<u64>) -> Coordinator {
        Coordinator {
            targets,
            rollback_to: None,
            votes: Mutex::default(),
            all_voted: watch::Sender::new(targets == 0),
            decided: watch::Sender::new(recorded.map(Decision::Switch)),
        }
    }

    /// A rollback's vote: every target prepares generation `to` again.
    pub(super) fn rollback(mut self, to: u64) -> Coordinator {
        self.rollback_to = Some(to);
        self
    }

    pub(super) fn rollback_to(&self) -> Option<u64> {
        self.rollback_to
    }

    pub(super) fn decided_before(&self) -> bool {
        self.decided.borrow().is_some()
    }

    /// The decision, once made (or recorded by an earlier run of the job).
    pub(super) fn decided(&self) -> Option<Decision> {
        self.decided.borrow().clone()
    }

    /// Casts a target's vote; a second vote of one target is ignored.
    pub(super) fn vote(&self, target: &str, vote: Result<Prepared, String>) {
        let mut v = self.votes.lock().expect("votes lock");
        if v.cast.contains_key(target) {
            return;
        }
        v.cast.insert(target.to_string(), vote);
        if v.cast.len() >= self.targets {
            self.all_voted.send_replace(true);
        }
    }

    /// Waits for every target's vote.
    pub(super) async fn tally(&self) -> Tally {
        let mut rx = self.all_voted.subscribe();
        let _ = rx.wait_for(|all| *all).await;
        let v = self.votes.lock().expect("votes lock");
        let mut refused: Vec<String> = v
            .cast
            .values()
            .filter_map(|r| r.as_ref().err().cloned())
            .collect();
        refused.sort();
        Tally {
            max_generation: v
                .cast
                .values()
                .filter_map(|r| r.as_ref().ok().map(|p| p.last_generation))
                .max()
                .unwrap_or(0),
            unchanged: refused.is_empty()
                && v.cast
                    .values()
                    .all(|r| r.as_ref().is_ok_and(|p| p.unchanged)),
            refused,
        }
    }

    pub(super) fn decide(&self, d: Decision) {
        self.decided.send_replace(Some(d));
    }

    /// Waits for the decision.
    pub(super) async fn decision(&self) -> Decision {
        let mut rx = self.decided.subscribe();
        let d = rx.wait_for(|d| d.is_some()).await;
        match d {
            Ok(d) => d.clone().expect("waited for a decision"),
            Err(_) => Decision::Abort("the job ended before its targets voted".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn decides_once_every_target_voted() {
        let at = |n| {
            Ok(Prepared {
                last_generation: n,
                unchanged: false,
            })
        };
        let c = Coordinator::new(2, None);
        c.vote("a", at(4));
        c.vote("a", Err("ignored: a voted already".into()));
        let tally = tokio::time::timeout(std::time::Duration::from_millis(50), c.tally()).await;
        assert!(tally.is_err(), "one of two targets voted: no tally yet");
        c.vote("b", at(7));
        let t = c.tally().await;
        assert_eq!(t.max_generation, 7);
        assert!(t.refused.is_empty() && !t.unchanged);
        c.decide(Decision::Switch(8));
        assert_eq!(c.decision().await, Decision::Switch(8));
    }

    #[tokio::test]
    async fn a_refusal_is_in_the_tally_and_a_recorded_decision_stands() {
        let c = Coordinator::new(2, None);
        let same = Ok(Prepared {
            last_generation: 1,
            unchanged: true,
        });
        c.vote("a", same.clone());
        c.vote("b", Err("b: no space".into()));
        let t = c.tally().await;
        assert_eq!(t.refused, vec!["b: no space".to_string()]);
        assert!(!t.unchanged, "a refusal is not a job that changed nothing");
        let c = Coordinator::new(2, None);
        c.vote("a", same.clone());
        c.vote("b", same);
        assert!(c.tally().await.unchanged);
        let resumed = Coordinator::new(2, Some(5));
        assert!(resumed.decided_before());
        assert_eq!(resumed.decision().await, Decision::Switch(5));
    }
}
