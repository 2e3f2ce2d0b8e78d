//! Live progress bars for `mirrorctl watch` on a terminal: one bar per target (bytes,
//! items, rate, ETA from the planned totals), item errors and other events printed
//! above the bars as they happen.

use std::collections::HashMap;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use cms_mirror::pb;

use crate::{event_line, human_bytes};

pub struct Bars {
    multi: MultiProgress,
    bars: HashMap<(String, String), ProgressBar>,
    style: ProgressStyle,
}

impl Bars {
    pub fn new() -> Bars {
        let style =
            ProgressStyle::with_template("{prefix:>14} [{bar:32.cyan/blue}] {percent:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)),
            bars: HashMap::new(),
            style,
        }
    }

    fn bar(&mut self, e: &pb::JobEvent) -> &ProgressBar {
        let key = (e.job_id.clone(), e.target.clone());
        let (multi, style) = (&self.multi, &self.style);
        self.bars.entry(key).or_insert_with(|| {
            let b = multi.add(ProgressBar::new(1).with_style(style.clone()));
            b.set_prefix(format!(
                "{} {}",
                &e.job_id[..8.min(e.job_id.len())],
                e.target
            ));
            b.enable_steady_tick(Duration::from_millis(250));
            b
        })
    }

    /// Prints a line above the bars.
    fn line(&self, s: String) {
        let _ = self.multi.println(s);
    }

    pub fn on_event(&mut self, e: &pb::JobEvent) {
        let d: Value = serde_json::from_str(&e.data_json).unwrap_or(Value::Null);
        let n = |k: &str| d[k].as_u64().unwrap_or(0);
        match e.kind.as_str() {
            "planned" | "progress" if !e.target.is_empty() => {
                let (bd, bt) = (n("bytes_done"), n("bytes_total"));
                let items = n("items_total") + n("deletes_total");
                let done = n("items_done") + n("deletes_done");
                let rate = n("rate_bytes_per_sec");
                let eta = match (rate, bt > bd) {
                    (r, true) if r > 0 => format!(", ETA {}", fmt_secs((bt - bd) / r)),
                    _ => String::new(),
                };
                let errors = match n("item_errors") {
                    0 => String::new(),
                    k => format!(", {k} error(s)"),
                };
                let b = self.bar(e);
                // Bytes drive the bar; a job with only deletes or empty files uses items.
                if bt > 0 {
                    b.set_length(bt);
                    b.set_position(bd);
                } else {
                    b.set_length(items.max(1));
                    b.set_position(done);
                }
                b.set_message(format!(
                    "items {done}/{items}, {} of {}, {}/s{eta}{errors}",
                    human_bytes(bd),
                    human_bytes(bt),
                    human_bytes(rate)
                ));
            }
            "committed" | "target_failed" if !e.target.is_empty() => {
                let b = self.bar(e).clone();
                if e.kind == "committed" {
                    b.set_position(b.length().unwrap_or(0));
                }
                b.finish();
                self.line(event_line(e));
            }
            "finished" => {
                for ((job, _), b) in &self.bars {
                    if *job == e.job_id && !b.is_finished() {
                        b.finish();
                    }
                }
                self.line(event_line(e));
            }
            _ => self.line(event_line(e)),
        }
    }
}

fn fmt_secs(s: u64) -> String {
    match s {
        0..=99 => format!("{s}s"),
        100..=5999 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
