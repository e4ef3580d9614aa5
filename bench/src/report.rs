//! Rows of figures, the table printed to the terminal, and `BENCHMARKS.md`.

use crate::machine::Machine;
use crate::stats::Spread;
use std::fmt::Write as _;

/// One figure of one subject.
#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: &'static str,
    pub subject: String,
    pub figure: &'static str,
    pub unit: &'static str,
    /// `None` when the subject could not be measured (`note` says why).
    pub spread: Option<Spread>,
    /// The median of the peer's same figure, for the ratio (ours ÷ peer).
    pub peer: Option<(String, f64)>,
    pub note: String,
}

impl Row {
    pub fn new(
        scenario: &'static str,
        subject: impl Into<String>,
        figure: &'static str,
        unit: &'static str,
        values: &[f64],
    ) -> Row {
        Row {
            scenario,
            subject: subject.into(),
            figure,
            unit,
            spread: Spread::of(values),
            peer: None,
            note: String::new(),
        }
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }

    pub fn against(mut self, peer: &Row) -> Row {
        if let Some(s) = peer.spread {
            self.peer = Some((peer.subject.clone(), s.median));
        }
        self
    }

    fn cells(&self) -> [String; 7] {
        let num = |v: f64| {
            if v.abs() >= 100.0 {
                format!("{v:.0}")
            } else if v.abs() >= 1.0 {
                format!("{v:.2}")
            } else {
                format!("{v:.3}")
            }
        };
        let (median, range) = match self.spread {
            Some(s) => (
                format!("{} {}", num(s.median), self.unit),
                format!("{} – {}", num(s.min), num(s.max)),
            ),
            None => ("not measured".into(), "—".into()),
        };
        let ratio = match (self.spread, &self.peer) {
            (Some(s), Some((peer, p))) if *p > 0.0 => format!("{:.2}× {peer}", s.median / p),
            _ => "—".into(),
        };
        [
            self.scenario.to_owned(),
            self.subject.clone(),
            self.figure.to_owned(),
            median,
            range,
            ratio,
            self.note.clone(),
        ]
    }
}

const HEADER: [&str; 7] = [
    "Scenario",
    "Subject",
    "Figure",
    "Median",
    "Min – max",
    "Ratio (ours ÷ peer)",
    "Notes",
];

/// The rows as a Markdown table (also readable in a terminal).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
    out.push_str(&line(&HEADER.map(str::to_owned)));
    out.push_str(&line(&HEADER.map(|_| "---".to_owned())));
    for row in rows {
        out.push_str(&line(&row.cells()));
    }
    out
}

/// What limits each figure now and what is not measured yet; written after the table.
pub const ANALYSIS: &str = include_str!("analysis.md");

/// The whole `BENCHMARKS.md`.
pub fn document(
    machine: &Machine,
    mode: &str,
    command: &str,
    rows: &[Row],
    failures: &[String],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Written by `vmc-bench` (`bench/`); run it with `{command}`. Figures are medians \
         with min – max over repetitions; for times and sizes a ratio below 1 means \
         vmcontroller is faster (or smaller) than the peer, for rates (MB/s, req/s) a \
         ratio above 1 does.\n"
    );
    let _ = writeln!(out, "**Machine:** {machine}  ");
    let _ = writeln!(out, "**Mode:** {mode}\n");
    out.push_str(&table(rows));
    if !failures.is_empty() {
        let _ = writeln!(out, "\n**Scenarios that failed in this run:**\n");
        for f in failures {
            let _ = writeln!(out, "- {f}");
        }
    }
    out.push('\n');
    out.push_str(ANALYSIS);
    out
}
