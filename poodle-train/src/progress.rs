//! What a training run shows while it runs: on a terminal an indicatif bar (step / total,
//! paper epoch, pairs/s, the loss terms, ETA); without one (Slurm logs) a plain line every
//! `log_every` steps with the same fields; with `--quiet` only the JSON lines that also go
//! to `metrics.jsonl`.

use crate::run::StepMetrics;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

enum Display {
    Bar(ProgressBar),
    Lines,
    Json,
}

pub struct StepReporter {
    display: Display,
    total: u64,
    start_step: u64,
    started: Instant,
}

impl StepReporter {
    /// `total` steps of the run, `start_step` where it resumes. `quiet`: JSON lines only.
    pub fn new(total: u64, start_step: u64, quiet: bool) -> Self {
        let display = if quiet {
            Display::Json
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} steps, ETA {eta_precise} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_position(start_step);
            bar.reset_eta();
            Display::Bar(bar)
        } else {
            Display::Lines
        };
        StepReporter {
            display,
            total,
            start_step,
            started: Instant::now(),
        }
    }

    /// One logged step (`json` is its `metrics.jsonl` line).
    pub fn report(&self, m: &StepMetrics, json: &str) {
        match &self.display {
            Display::Json => eprintln!("{json}"),
            Display::Bar(bar) => {
                bar.set_position(m.step);
                bar.set_message(fields(m));
            }
            Display::Lines => eprintln!(
                "step {}/{} ({:.1}%) {} | ETA {}",
                m.step,
                self.total,
                100.0 * m.step as f64 / self.total.max(1) as f64,
                fields(m),
                format_secs(self.eta_secs(m.step)),
            ),
        }
    }

    /// Seconds left at `step`, from the pace since this process started.
    fn eta_secs(&self, step: u64) -> f64 {
        let done = step.saturating_sub(self.start_step).max(1) as f64;
        let left = self.total.saturating_sub(step) as f64;
        self.started.elapsed().as_secs_f64() / done * left
    }

    pub fn finish(&self) {
        if let Display::Bar(bar) = &self.display {
            bar.finish();
        }
    }
}

fn fields(m: &StepMetrics) -> String {
    format!(
        "epoch {:.2} | {:.1} pairs/s | loss {:.4} (dense {:.4}, pooled {:.4}) | mask {:.2}",
        m.epoch, m.pairs_per_s, m.loss.total, m.loss.dense, m.loss.pooled, m.dense_mask_fraction
    )
}

/// `1h02m03s`, `4m05s`, `6s`.
pub fn format_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    let (h, m, sec) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m{sec:02}s")
    } else if m > 0 {
        format!("{m}m{sec:02}s")
    } else {
        format!("{sec}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(format_secs(6.4), "6s");
        assert_eq!(format_secs(245.0), "4m05s");
        assert_eq!(format_secs(3723.0), "1h02m03s");
        assert_eq!(format_secs(-3.0), "0s");
    }

    #[test]
    fn eta_follows_the_pace_since_the_start() {
        let r = StepReporter {
            display: Display::Json,
            total: 100,
            start_step: 40,
            started: Instant::now() - std::time::Duration::from_secs(30),
        };
        // 10 steps in 30 s since resuming at 40: 50 steps left take 150 s.
        assert!((r.eta_secs(50) - 150.0).abs() < 1.0, "{}", r.eta_secs(50));
    }
}
