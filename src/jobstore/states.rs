//! The states a job and each of its targets go through, as stored.

use serde::{Deserialize, Serialize};

/// Job states, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    CompletedWithErrors,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::CompletedWithErrors => "completed_with_errors",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "completed_with_errors" => JobState::CompletedWithErrors,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// Where one target of a job stands, as stored in `job_targets.state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    Pending,
    Connecting,
    Planning,
    /// Planned in a dry run: nothing is sent.
    Planned,
    Sending,
    /// Packages are in flight and the target has not answered for a while (stopped,
    /// overloaded, or behind a broken route); back to `Sending` at its next answer.
    Stalled,
    /// The target's disk is full and the channel waits for space.
    WaitingForSpace,
    Committed,
    CompletedWithErrors,
    Failed,
    Cancelled,
}

impl TargetState {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Pending => "pending",
            TargetState::Connecting => "connecting",
            TargetState::Planning => "planning",
            TargetState::Planned => "planned",
            TargetState::Sending => "sending",
            TargetState::Stalled => "stalled",
            TargetState::WaitingForSpace => "waiting_for_space",
            TargetState::Committed => "committed",
            TargetState::CompletedWithErrors => "completed_with_errors",
            TargetState::Failed => "failed",
            TargetState::Cancelled => "cancelled",
        }
    }
}
