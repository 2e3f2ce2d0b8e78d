//! `mirrorctl`: the admin and monitoring client of mirror-source.
//!
//! Exit codes: 0 success; for `start --wait` 1 when the job completed with item errors
//! and 2 when it failed or was cancelled; 3 for a usage or connection error.
#![forbid(unsafe_code)]

mod bars;
mod dashboard;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use cms_mirror::pb;
use cms_mirror::pb::source_service_client::SourceServiceClient;

/// `println!` for output a reader may stop reading (`mirrorctl plan JOB | head`): a
/// closed pipe ends the program quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = writeln!(stdout, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            panic!("cannot write to stdout: {e}");
        }
    }};
}

/// Why a command could not be carried out (exit code 3).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error("mirror-source: {0}")]
    Connect(#[from] cms_mirror::security::SecurityError),
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error(transparent)]
    Bind(#[from] cms_mirror::observe::BindError),
    #[error("dashboard server: {0}")]
    Serve(#[from] std::io::Error),
}

/// The admin client of the source service.
pub(crate) type Client = SourceServiceClient<cms_mirror::security::AuthChannel>;

#[derive(Parser, Debug)]
#[command(
    name = "mirrorctl",
    version,
    about = "Start, inspect and watch cms-mirror jobs"
)]
struct Cli {
    /// URL of the mirror-source service.
    #[arg(
        long,
        global = true,
        env = "MIRROR_SOURCE",
        default_value = "http://127.0.0.1:7700"
    )]
    source: String,
    /// Bearer token presented to the source (prefer the environment variable: a flag
    /// shows in the process list).
    #[arg(long, global = true, env = "MIRROR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA bundle for an https:// source (default: the system's roots).
    #[arg(long, global = true, env = "MIRROR_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Client certificate for a source that requires mutual TLS (with --key-file).
    #[arg(long, global = true, env = "MIRROR_CERT_FILE")]
    cert_file: Option<std::path::PathBuf>,
    /// Private key of --cert-file.
    #[arg(long, global = true, env = "MIRROR_KEY_FILE")]
    key_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a job for a channel.
    Start {
        channel: String,
        /// Send everything, ignoring what the targets already have.
        #[arg(long)]
        full: bool,
        /// Plan only: report what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Compare content hashes instead of size and mtime.
        #[arg(long)]
        checksum: bool,
        /// Mirror only this path (repeatable).
        #[arg(long = "path")]
        paths: Vec<String>,
        /// This job only: delete at most N items (or N% of the items) per target,
        /// instead of the channel's max_delete.
        #[arg(long, value_name = "N|N%")]
        max_delete: Option<String>,
        /// Follow the job to its end; exit 0 succeeded, 1 completed with errors, 2 failed or cancelled.
        #[arg(long)]
        wait: bool,
        /// Who asks (stored with the job).
        #[arg(long, env = "USER", default_value = "")]
        requested_by: String,
        #[arg(long)]
        json: bool,
    },
    /// List recent jobs.
    Jobs {
        #[arg(long)]
        channel: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show one job with its targets and item errors.
    Show {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// List channels with their targets and sync lag.
    Channels {
        #[arg(long)]
        json: bool,
    },
    /// Check each target of a channel (or of every channel) now: reachable, TLS, token
    /// accepted, protocol version, site writable, free space. Exit 0 when every target
    /// is ok, 1 when one is not.
    Check {
        channel: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the generations each target of a channel published atomically keeps:
    /// number, the job that built it, when it was first served, files and bytes; `*`
    /// marks the live one.
    Generations {
        channel: String,
        #[arg(long)]
        json: bool,
    },
    /// Switch every target of a channel published atomically back to an earlier
    /// generation, all together (a job like any other: stored, watched, hooks run).
    Rollback {
        channel: String,
        /// The generation to go back to (default: the newest before the live one that
        /// every target keeps).
        #[arg(long, value_name = "N")]
        to: Option<u64>,
        /// Follow the job to its end; exit 0 succeeded, 2 failed.
        #[arg(long)]
        wait: bool,
        /// Who asks (stored with the job).
        #[arg(long, env = "USER", default_value = "")]
        requested_by: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job.
    Cancel {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// Follow a job (or all jobs) live.
    Watch {
        job: Option<String>,
        #[arg(long)]
        channel: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print the per-item plan of a job (what a dry run found).
    Plan {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (e.g. `mirrorctl completions bash >
    /// /etc/bash_completion.d/mirrorctl`).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff; e.g. `mirrorctl man > /usr/local/share/man/man1/mirrorctl.1`).
    Man,
    /// Serve the web dashboard (channels, live jobs, history, job details).
    Dashboard {
        /// Address to serve on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
    },
}

fn state_name(s: i32) -> &'static str {
    match pb::JobState::try_from(s).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Queued => "queued",
        pb::JobState::Running => "running",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::CompletedWithErrors => "completed_with_errors",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
        pb::JobState::Unspecified => "unknown",
    }
}

fn trigger_name(t: i32) -> &'static str {
    match pb::Trigger::try_from(t).unwrap_or(pb::Trigger::Unspecified) {
        pb::Trigger::Admin => "admin",
        pb::Trigger::Schedule => "schedule",
        pb::Trigger::Api => "api",
        pb::Trigger::Watch => "watch",
        pb::Trigger::Unspecified => "",
    }
}

pub(crate) fn job_json(j: &pb::Job) -> Value {
    json!({
        "id": j.id, "channel": j.channel, "state": state_name(j.state), "trigger": trigger_name(j.trigger),
        "requested_by": j.requested_by, "created_at": j.created_at, "started_at": j.started_at,
        "finished_at": j.finished_at, "error": j.error, "summary": j.summary, "dry_run": j.dry_run,
        "full": j.full, "checksum": j.checksum, "paths": j.paths,
        "rollback": j.rollback, "rollback_to": j.rollback_to,
        "targets": j.targets.iter().map(|t| json!({
            "target": t.target, "url": t.url, "site": t.site, "state": t.state, "error": t.error,
            "items_total": t.items_total, "items_done": t.items_done,
            "bytes_total": t.bytes_total, "bytes_done": t.bytes_done,
            "deletes_total": t.deletes_total, "deletes_done": t.deletes_done,
            "packages_sent": t.packages_sent, "packages_acked": t.packages_acked,
            "packages_retried": t.packages_retried, "bytes_on_wire": t.bytes_on_wire,
            "item_errors": t.item_errors, "reconnects": t.reconnects, "last_acked_seq": t.last_acked_seq,
        })).collect::<Vec<_>>(),
        "item_errors": j.item_errors.iter().map(|e| {
            let ie = e.error.clone().unwrap_or_default();
            json!({"target": e.target, "path": ie.path, "code": ie.code, "message": ie.message, "retryable": ie.retryable, "at": e.at})
        }).collect::<Vec<_>>(),
    })
}

pub(crate) fn channel_json(ch: &pb::Channel) -> Value {
    json!({
        "name": ch.name, "source": ch.source, "schedule": ch.schedule, "delete": ch.delete, "publish": ch.publish,
        "last_job_id": ch.last_job_id, "last_job_state": state_name(ch.last_job_state),
        "targets": ch.targets.iter().map(|t| json!({"name": t.name, "url": t.url, "site": t.site, "last_success_at": t.last_success_at, "lag_seconds": t.lag_seconds, "lagging": t.lagging, "health": t.health.as_ref().map(health_json)})).collect::<Vec<_>>(),
    })
}

/// Bytes in IEC units, as the job summaries write them (`4.0 MiB`).
pub(crate) fn human_bytes(b: u64) -> String {
    bytesize::ByteSize(b).to_string()
}

fn print_job(j: &pb::Job) {
    out!(
        "job {}  channel {}  {}{}",
        j.id,
        j.channel,
        state_name(j.state),
        if j.dry_run {
            "  (dry run: nothing was changed)"
        } else {
            ""
        }
    );
    out!(
        "  trigger {} by {:?}  created {}  started {}  finished {}",
        trigger_name(j.trigger),
        j.requested_by,
        j.created_at,
        j.started_at,
        j.finished_at
    );
    if !j.summary.is_empty() {
        out!("  {}", j.summary);
    }
    if !j.error.is_empty() {
        out!("  error: {}", j.error);
    }
    for t in &j.targets {
        out!(
            "  target {} [{}]: items {}/{}, bytes {}/{} ({} on the wire), deletes {}/{}, packages {}/{} acked, {} item error(s){}",
            t.target,
            t.state,
            t.items_done,
            t.items_total,
            human_bytes(t.bytes_done),
            human_bytes(t.bytes_total),
            human_bytes(t.bytes_on_wire),
            t.deletes_done,
            t.deletes_total,
            t.packages_acked,
            t.packages_sent,
            t.item_errors,
            if t.error.is_empty() {
                String::new()
            } else {
                format!(": {}", t.error)
            }
        );
    }
    for e in &j.item_errors {
        let ie = e.error.clone().unwrap_or_default();
        out!(
            "  item error [{}] {}: {} ({})",
            e.target,
            ie.path,
            ie.message,
            ie.code
        );
    }
}

/// Prints a job as pretty JSON or as text.
fn output_job(j: &pb::Job, json: bool) {
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&job_json(j)).unwrap_or_default()
        );
    } else {
        print_job(j);
    }
}

/// An event as one JSON object (`--json` output of watch).
pub(crate) fn event_json(e: &pb::JobEvent) -> Value {
    json!({
        "id": e.id, "job_id": e.job_id, "seq": e.seq, "kind": e.kind, "at": e.at, "target": e.target,
        "data": serde_json::from_str::<Value>(&e.data_json).unwrap_or(Value::Null), "missed": e.missed,
    })
}

/// One line per event, for terminals and logs alike.
pub(crate) fn event_line(e: &pb::JobEvent) -> String {
    let d: Value = serde_json::from_str(&e.data_json).unwrap_or(Value::Null);
    let who = if e.target.is_empty() {
        String::new()
    } else {
        format!(" [{}]", e.target)
    };
    let detail = match e.kind.as_str() {
        "planned" => {
            let deltas = match d["delta_files"].as_u64().unwrap_or(0) {
                0 => String::new(),
                n => format!(
                    "; {n} changed files ({}) may go as deltas",
                    human_bytes(d["delta_bytes"].as_u64().unwrap_or(0))
                ),
            };
            format!(
                "{} items, {}, {} deletes to send ({} unchanged){deltas}",
                d["items_total"],
                human_bytes(d["bytes_total"].as_u64().unwrap_or(0)),
                d["deletes_total"],
                d["unchanged"]
            )
        }
        "progress" => {
            let (bd, bt) = (
                d["bytes_done"].as_u64().unwrap_or(0),
                d["bytes_total"].as_u64().unwrap_or(0),
            );
            let rate = d["rate_bytes_per_sec"].as_u64().unwrap_or(0);
            let eta = if rate > 0 && bt > bd {
                format!(", ETA {}s", (bt - bd) / rate.max(1))
            } else {
                String::new()
            };
            let wire = human_bytes(d["bytes_on_wire"].as_u64().unwrap_or(0));
            let limit = match d["bwlimit_bytes_per_sec"].as_u64() {
                Some(l) => format!(" (limit {}/s)", human_bytes(l)),
                None => String::new(),
            };
            format!(
                "items {}/{}, {}/{}, deletes {}/{}, {wire} on the wire, {}/s{limit}{eta}",
                d["items_done"],
                d["items_total"],
                human_bytes(bd),
                human_bytes(bt),
                d["deletes_done"],
                d["deletes_total"],
                human_bytes(rate)
            )
        }
        "item_failed" => format!(
            "{}: {} ({})",
            d["path"].as_str().unwrap_or(""),
            d["message"].as_str().unwrap_or(""),
            d["code"].as_str().unwrap_or("")
        ),
        "finished" => format!(
            "{}{}{}",
            d["state"].as_str().unwrap_or(""),
            d["summary"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(|s| format!(": {s}"))
                .unwrap_or_default(),
            d["error"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(|s| format!(" (error: {s})"))
                .unwrap_or_default()
        ),
        "prepared" => "its new generation is whole and durable; waiting for the others".into(),
        "publish_decided" => match d["generation"].as_u64() {
            Some(n) if d["switch"] == true => {
                format!("every target prepared: switch to generation {n}")
            }
            _ if d["unchanged"] == true => {
                "nothing changed on any target: the live generation stays".into()
            }
            _ => format!("no target switches: {}", d["error"].as_str().unwrap_or("")),
        },
        "switched" => format!("serving generation {}", d["generation"]),
        _ => {
            if d.as_object().is_some_and(|o| !o.is_empty()) {
                d.to_string()
            } else {
                String::new()
            }
        }
    };
    let missed = if e.missed > 0 {
        format!(" ({} events missed)", e.missed)
    } else {
        String::new()
    };
    format!(
        "{} {} #{} {}{who} {detail}{missed}",
        e.at,
        short_id(&e.job_id),
        e.seq,
        e.kind
    )
}

impl Cli {
    fn auth(&self) -> cms_mirror::security::ClientAuth {
        cms_mirror::security::ClientAuth {
            token: self.token.clone(),
            token_file: None,
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        }
    }
}

async fn connect(cli: &Cli) -> Result<Client, CliError> {
    let ch = cli.auth().connect(&cli.source).await?;
    Ok(Client::new(ch).max_decoding_message_size(cms_mirror::transport::MAX_MESSAGE))
}

/// Follows a job until it finishes; returns its final state.
async fn follow(client: &mut Client, job: &str, json_out: bool) -> Result<i32, CliError> {
    let req = pb::WatchJobsRequest {
        job_id: job.to_string(),
        ..Default::default()
    };
    print_events(client, req, json_out).await?;
    let j = client
        .get_job(pb::GetJobRequest {
            job_id: job.to_string(),
        })
        .await?
        .into_inner();
    Ok(j.state)
}

/// Prints a watch's events as they arrive (JSON lines or text), until the stream ends
/// or, for one job, its `finished` event. A person at a terminal gets progress bars (on
/// stderr); a pipe or a file gets one line per event on stdout.
async fn print_events(
    client: &mut Client,
    req: pb::WatchJobsRequest,
    json_out: bool,
) -> Result<(), CliError> {
    let one_job = !req.job_id.is_empty();
    let mut stream = client.watch_jobs(req).await?.into_inner();
    let mut bars = (!json_out && std::io::stderr().is_terminal()).then(bars::Bars::new);
    let lines = !json_out && (bars.is_none() || !std::io::stdout().is_terminal());
    while let Some(e) = stream.message().await? {
        if json_out {
            out!("{}", event_json(&e));
        }
        if let Some(b) = &mut bars {
            b.on_event(&e);
        }
        if lines {
            out!("{}", event_line(&e));
        }
        if one_job && e.kind == "finished" {
            break;
        }
    }
    Ok(())
}

impl Cmd {
    fn name(&self) -> String {
        format!("{self:?}")
            .split(|c: char| !c.is_alphanumeric())
            .next()
            .unwrap_or_default()
            .to_lowercase()
    }
}

fn exit_for(state: i32) -> ExitCode {
    match pb::JobState::try_from(state).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Succeeded => ExitCode::from(0),
        pb::JobState::CompletedWithErrors => ExitCode::from(1),
        _ => ExitCode::from(2),
    }
}

/// The commands that need no connection to the source: completions and the manual
/// page (printed), the dashboard (which starts even while the source is down; its pages
/// say so).
async fn run_local(cli: &Cli) -> Option<Result<ExitCode, CliError>> {
    use clap::CommandFactory;
    match &cli.cmd {
        Cmd::Completions { shell } => {
            let mut out = std::io::stdout();
            clap_complete::generate(*shell, &mut Cli::command(), "mirrorctl", &mut out);
        }
        Cmd::Man => {
            let rendered = clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout());
            if let Err(e) = rendered
                && e.kind() != std::io::ErrorKind::BrokenPipe
            {
                return Some(Err(e.into()));
            }
        }
        Cmd::Dashboard { listen } => {
            let served = async {
                let ch = cli.auth().channel(&cli.source)?;
                let client =
                    Client::new(ch).max_decoding_message_size(cms_mirror::transport::MAX_MESSAGE);
                dashboard::serve(listen, client, &cli.source).await
            };
            return Some(served.await.map(|()| ExitCode::SUCCESS));
        }
        _ => return None,
    }
    Some(Ok(ExitCode::SUCCESS))
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    if let Some(done) = run_local(&cli).await {
        return done;
    }
    let mut c = connect(&cli).await?;
    match cli.cmd {
        Cmd::Dashboard { .. } | Cmd::Completions { .. } | Cmd::Man => {
            unreachable!("done above")
        }
        Cmd::Start {
            channel,
            full,
            dry_run,
            checksum,
            paths,
            max_delete,
            wait,
            requested_by,
            json,
        } => {
            let req = pb::StartJobRequest {
                channel,
                trigger: pb::Trigger::Admin as i32,
                requested_by,
                full,
                dry_run,
                checksum,
                paths,
                lineage: Vec::new(),
                max_delete: max_delete.unwrap_or_default(),
                ..Default::default()
            };
            start(&mut c, req, wait, json).await
        }
        Cmd::Rollback {
            channel,
            to,
            wait,
            requested_by,
            json,
        } => {
            let req = pb::StartJobRequest {
                channel,
                trigger: pb::Trigger::Admin as i32,
                requested_by,
                rollback: true,
                rollback_to: to,
                ..Default::default()
            };
            start(&mut c, req, wait, json).await
        }
        Cmd::Generations { channel, json } => generations(&mut c, channel, json).await,
        Cmd::Jobs {
            channel,
            limit,
            json,
        } => list_jobs(&mut c, channel, limit, json).await,
        Cmd::Show { job, json } => {
            let j = c
                .get_job(pb::GetJobRequest { job_id: job })
                .await?
                .into_inner();
            output_job(&j, json);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Channels { json } => list_channels(&mut c, json).await,
        Cmd::Check { channel, json } => check(&mut c, channel, json).await,
        Cmd::Cancel { job, json } => cancel(&mut c, job, json).await,
        Cmd::Watch { job, channel, json } => match job {
            Some(job) => {
                let state = follow(&mut c, &job, json).await?;
                Ok(exit_for(state))
            }
            None => {
                let req = pb::WatchJobsRequest {
                    channel: channel.unwrap_or_default(),
                    live_only: true,
                    ..Default::default()
                };
                print_events(&mut c, req, json).await?;
                Ok(ExitCode::SUCCESS)
            }
        },
        Cmd::Plan { job, json } => {
            print_plan(&mut c, &job, json).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `start`: starts a job; with `wait`, follows it to its end and exits with its outcome.
async fn start(
    c: &mut Client,
    req: pb::StartJobRequest,
    wait: bool,
    json: bool,
) -> Result<ExitCode, CliError> {
    let dry_run = req.dry_run;
    let r = c
        .start_job(cms_mirror::telemetry::inject(tonic::Request::new(req)))
        .await?
        .into_inner();
    if !wait {
        if json {
            out!("{}", json!({"job_id": r.job_id, "coalesced": r.coalesced}));
        } else {
            let folded = if r.coalesced {
                " (coalesced into the queued job)"
            } else {
                ""
            };
            out!("{}{folded}", r.job_id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !json {
        eprintln!("job {} started", r.job_id);
    }
    let state = tokio::select! {
        s = follow(c, &r.job_id, false) => s?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!(
                "\nmirrorctl: stopped watching; job {id} goes on in mirror-source. \
                 Follow it again with `mirrorctl watch {short}`, stop it with `mirrorctl cancel {short}`.",
                id = r.job_id,
                short = short_id(&r.job_id),
            );
            return Ok(ExitCode::from(130));
        }
    };
    let j = c
        .get_job(pb::GetJobRequest {
            job_id: r.job_id.clone(),
        })
        .await?
        .into_inner();
    if dry_run {
        print_plan(c, &r.job_id, json).await?;
    }
    output_job(&j, json);
    Ok(exit_for(state))
}

/// The short form of a job id shown in event lines; any unique prefix is accepted.
fn short_id(id: &str) -> &str {
    &id[..8.min(id.len())]
}

/// `jobs`: the newest jobs, one line each.
async fn list_jobs(
    c: &mut Client,
    channel: Option<String>,
    limit: u32,
    json: bool,
) -> Result<ExitCode, CliError> {
    let r = c
        .list_jobs(pb::ListJobsRequest {
            channel: channel.unwrap_or_default(),
            limit,
        })
        .await?
        .into_inner();
    if json {
        let all: Vec<Value> = r.jobs.iter().map(job_json).collect();
        out!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    for j in &r.jobs {
        out!(
            "{}  {:<12} {:<22} {:<8} {}  {}{}",
            j.id,
            j.channel,
            state_name(j.state),
            trigger_name(j.trigger),
            j.created_at,
            if j.dry_run { "[dry run] " } else { "" },
            j.summary
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `cancel`: asks the source to cancel a job.
async fn cancel(c: &mut Client, job: String, json: bool) -> Result<ExitCode, CliError> {
    let j = c
        .cancel_job(pb::CancelJobRequest { job_id: job })
        .await?
        .into_inner();
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&job_json(&j)).unwrap_or_default()
        );
    } else {
        out!(
            "cancel requested for job {} (now {})",
            j.id,
            state_name(j.state)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `check`: each target's checks, one line per check.
async fn generations(c: &mut Client, channel: String, json: bool) -> Result<ExitCode, CliError> {
    let r = c
        .list_generations(pb::ListGenerationsRequest { channel })
        .await?
        .into_inner();
    let all_ok = r.targets.iter().all(|t| t.error.is_empty());
    if json {
        let v: Vec<Value> = r.targets.iter().map(generations_json).collect();
        out!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::from(if all_ok { 0 } else { 1 }));
    }
    for t in &r.targets {
        if !t.error.is_empty() {
            out!("{}: cannot list its generations: {}", t.target, t.error);
            continue;
        }
        if t.generations.is_empty() {
            out!(
                "{}: no generations (nothing published atomically yet)",
                t.target
            );
            continue;
        }
        out!("{}:", t.target);
        for g in &t.generations {
            let when = if g.published_at_ms > 0 {
                cms_mirror::ms_to_rfc3339(g.published_at_ms)
            } else {
                "-".into()
            };
            let job = if g.job_id.is_empty() {
                "(before atomic publish)"
            } else {
                &g.job_id[..g.job_id.len().min(8)]
            };
            out!(
                "  {} {:>5}  {:<24}  {:<24}  {} files, {}",
                if g.live { "*" } else { " " },
                g.number,
                job,
                when,
                g.files,
                bytesize::ByteSize(g.bytes)
            );
        }
    }
    Ok(ExitCode::from(if all_ok { 0 } else { 1 }))
}

pub(crate) fn generations_json(t: &pb::TargetGenerations) -> Value {
    json!({
        "target": t.target, "error": t.error,
        "generations": t.generations.iter().map(|g| json!({
            "number": g.number, "job_id": g.job_id, "published_at_ms": g.published_at_ms,
            "files": g.files, "bytes": g.bytes, "live": g.live,
        })).collect::<Vec<_>>(),
    })
}

async fn check(c: &mut Client, channel: Option<String>, json: bool) -> Result<ExitCode, CliError> {
    let r = c
        .check_targets(pb::CheckTargetsRequest {
            channel: channel.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let all_ok = r.targets.iter().all(|t| t.status == "ok");
    if json {
        let v: Vec<Value> = r.targets.iter().map(health_json).collect();
        out!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for t in &r.targets {
            out!(
                "{} -> {} ({}, site {}): {}",
                t.channel,
                t.target,
                t.url,
                t.site,
                t.status
            );
            for s in &t.steps {
                out!(
                    "  {:<4} {:<11} {}",
                    if s.ok { "ok" } else { "FAIL" },
                    s.name,
                    s.detail
                );
            }
        }
    }
    Ok(ExitCode::from(if all_ok { 0 } else { 1 }))
}

pub(crate) fn health_json(h: &pb::TargetHealth) -> Value {
    json!({
        "channel": h.channel, "target": h.target, "url": h.url, "site": h.site,
        "status": h.status, "detail": h.detail, "checked_at": h.checked_at, "free_bytes": h.free_bytes,
        "steps": h.steps.iter().map(|s| json!({"name": s.name, "ok": s.ok, "detail": s.detail})).collect::<Vec<_>>(),
    })
}

/// `channels`: each channel with its targets' sync lag.
async fn list_channels(c: &mut Client, json: bool) -> Result<ExitCode, CliError> {
    let r = c
        .list_channels(pb::ListChannelsRequest {})
        .await?
        .into_inner();
    if json {
        let v: Vec<Value> = r.channels.iter().map(channel_json).collect();
        out!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    for ch in &r.channels {
        out!(
            "{}  source {}  last job {} {}",
            ch.name,
            ch.source,
            ch.last_job_id,
            state_name(ch.last_job_state)
        );
        for t in &ch.targets {
            let lag = if t.lag_seconds < 0 {
                "never synced".to_string()
            } else {
                format!("lag {}s", t.lag_seconds)
            };
            let health = t
                .health
                .as_ref()
                .map_or("not checked yet".to_string(), |h| {
                    if h.status == "ok" {
                        "ok".to_string()
                    } else {
                        format!("{}: {}", h.status, h.detail)
                    }
                });
            let behind = if t.lagging {
                " (LAGGING: over max_lag_secs)"
            } else {
                ""
            };
            out!(
                "  -> {} ({}, site {}): {lag}{behind}; {health}",
                t.name,
                t.url,
                t.site
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a job's plan, one line per item like `rsync -i`.
async fn print_plan(c: &mut Client, job: &str, json: bool) -> Result<(), CliError> {
    let mut s = c
        .get_plan(pb::GetPlanRequest {
            job_id: job.to_string(),
            target: String::new(),
        })
        .await?
        .into_inner();
    while let Some(p) = s.message().await? {
        let m = p.meta.unwrap_or_default();
        let kind = cms_mirror::model::Kind::from_pb(m.kind)
            .map(|k| k.as_str())
            .unwrap_or("?");
        if json {
            out!(
                "{}",
                json!({"target": p.target, "action": p.action, "kind": kind, "path": m.path, "size": m.size})
            );
        } else {
            let code = match (p.action.as_str(), kind) {
                ("delete", _) => "*deleting".to_string(),
                (a, k) => format!("{}{}", if a == "create" { ">+" } else { ">c" }, &k[..1]),
            };
            out!("{code:<10} {:<40} {:>10}  [{}]", m.path, m.size, p.target);
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Traces go to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set; the guard flushes them
    // before the process exits.
    let telemetry = cms_mirror::telemetry::init(Default::default(), "mirrorctl");
    let span = tracing::info_span!("mirrorctl", command = %cli.cmd.name());
    let source = cli.source.clone();
    let code = match tracing::Instrument::instrument(run(cli), span).await {
        Ok(code) => code,
        Err(CliError::Status(s)) if s.code() == tonic::Code::Unimplemented => {
            eprintln!(
                "mirrorctl: {source} does not serve the source API (a mirror-target? point --source or MIRROR_SOURCE at mirror-source)"
            );
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("mirrorctl: {e}");
            ExitCode::from(3)
        }
    };
    drop(telemetry);
    code
}
