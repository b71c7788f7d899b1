//! What `ppuctl watch` writes for each event. On a terminal, step progress is collapsed into
//! one status line at the bottom that is rewritten in place (how many other steps are running,
//! then the latest progress of the most recently active step); every other event is printed
//! above it as a line of its own. Anywhere else (a pipe, a file, `--json`) every event is one
//! plain line, so scripts and logs see them all.

use ppu_proto::v1 as pb;
use ppu_proto::v1::event::Kind;

/// Carriage return and "erase the whole line" (ECMA-48 EL 2): rewinds over the status line.
const CLEAR_LINE: &str = "\r\x1b[2K";

/// Turns events into the text to write.
pub struct Printer {
    /// Collapse step progress into a status line (stdout is a terminal, human output).
    collapse: bool,
    /// Terminal width: the status line is cut to fit, or it would wrap and not be rewritten.
    width: Option<usize>,
    /// The latest progress line of each running step, least recently updated first:
    /// ((experiment id, step index), rendered line).
    active: Vec<((String, u32), String)>,
    /// Whether a status line is on screen (the cursor is at its end).
    shown: bool,
}

impl Printer {
    pub fn new(collapse: bool, width: Option<usize>) -> Printer {
        Printer {
            collapse,
            width,
            active: Vec::new(),
            shown: false,
        }
    }

    /// The text to write for `event`, already rendered as `line`.
    pub fn event(&mut self, event: &pb::Event, line: &str) -> String {
        if !self.collapse {
            return format!("{line}\n");
        }
        let mut out = String::new();
        if self.shown {
            out.push_str(CLEAR_LINE);
        }
        match &event.kind {
            Some(Kind::StepProgress(p)) => {
                let key = (event.experiment_id.clone(), p.step_index);
                self.active.retain(|(k, _)| *k != key);
                self.active.push((key, line.to_owned()));
            }
            other => {
                out.push_str(line);
                out.push('\n');
                match other {
                    Some(Kind::StepFinished(f)) => {
                        let step = f.result.as_ref().map_or(0, |r| r.step_index);
                        let key = (event.experiment_id.clone(), step);
                        self.active.retain(|(k, _)| *k != key);
                    }
                    Some(Kind::ExperimentStateChanged(_)) => {
                        self.active.retain(|((e, _), _)| *e != event.experiment_id);
                    }
                    _ => {}
                }
            }
        }
        self.shown = false;
        if let Some(status) = self.status() {
            out.push_str(&status);
            self.shown = true;
        }
        out
    }

    /// What to write before exiting: ends an open status line.
    pub fn finish(&mut self) -> &'static str {
        if std::mem::take(&mut self.shown) {
            "\n"
        } else {
            ""
        }
    }

    fn status(&self) -> Option<String> {
        let (_, latest) = self.active.last()?;
        // The count goes first: cutting the line to the terminal's width must not hide it.
        let others = self.active.len() - 1;
        let mut status = if others > 0 {
            format!("[+{others} more running] {latest}")
        } else {
            latest.clone()
        };
        if let Some(width) = self.width {
            // One column spare: writing the last column makes some terminals wrap.
            let fit = width.saturating_sub(1).max(1);
            if status.chars().count() > fit {
                status = status.chars().take(fit.saturating_sub(1)).collect();
                status.push('…');
            }
        }
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(experiment: &str, kind: Kind) -> pb::Event {
        pb::Event {
            experiment_id: experiment.into(),
            kind: Some(kind),
            ..Default::default()
        }
    }

    fn progress(experiment: &str, step: u32) -> pb::Event {
        event(
            experiment,
            Kind::StepProgress(pb::StepProgress {
                step_index: step,
                ..Default::default()
            }),
        )
    }

    #[test]
    fn off_a_terminal_every_event_is_a_plain_line() {
        let mut p = Printer::new(false, Some(80));
        let text: String = [
            p.event(&progress("A", 0), "p1"),
            p.event(&progress("A", 0), "p2"),
            p.event(&event("A", Kind::Alarm(Default::default())), "alarm"),
        ]
        .concat();
        assert_eq!(text, "p1\np2\nalarm\n");
        assert_eq!(p.finish(), "");
    }

    #[test]
    fn on_a_terminal_progress_rewrites_one_status_line() {
        let mut p = Printer::new(true, None);
        assert_eq!(p.event(&progress("A", 0), "A 10%"), "A 10%");
        assert_eq!(p.event(&progress("A", 0), "A 20%"), "\r\x1b[2KA 20%");
        // Another event goes above the status line, which is drawn again below it.
        assert_eq!(
            p.event(&event("", Kind::Alarm(Default::default())), "alarm"),
            "\r\x1b[2Kalarm\nA 20%"
        );
        // A second running step: the newest progress shows, with a count of the others.
        assert_eq!(
            p.event(&progress("B", 1), "B 5%"),
            "\r\x1b[2K[+1 more running] B 5%"
        );
        // A finished step leaves the status line; the other one shows again.
        let finished = event(
            "B",
            Kind::StepFinished(pb::StepFinished {
                result: Some(pb::StepResult {
                    step_index: 1,
                    ..Default::default()
                }),
            }),
        );
        assert_eq!(p.event(&finished, "B done"), "\r\x1b[2KB done\nA 20%");
        // The experiment ending clears its steps: no status line is left open.
        let ended = event("A", Kind::ExperimentStateChanged(Default::default()));
        assert_eq!(p.event(&ended, "A succeeded"), "\r\x1b[2KA succeeded\n");
        assert_eq!(p.finish(), "");
        assert_eq!(p.event(&progress("C", 0), "C 1%"), "C 1%");
        assert_eq!(p.finish(), "\n");
    }

    #[test]
    fn the_status_line_is_cut_to_the_terminal_width() {
        let mut p = Printer::new(true, Some(10));
        assert_eq!(p.event(&progress("A", 0), "0123456789abc"), "01234567…");
    }
}
