//! `evalflow logs`: how a run's job ended, the evidence for it, and the end
//! of its output: read from its job directory, or on AWS from its
//! CloudWatch Logs stream.
//!
//! What a job printed is the submission's, so it is shown as text only
//! ([`printable`]): a submission cannot retitle the operator's terminal,
//! clear it, move its cursor to overwrite what evalflow printed, or set off
//! anything else a terminal does on an escape sequence.

use std::fs;

use anyhow::{Result, bail};
use evalflow_activities::aws::logs::{LOG_GROUP, TAIL_BYTES_MAX, TAIL_EVENTS, stream_of};
use evalflow_activities::local::job::{JobPaths, tail};
use evalflow_worker::api::operations::History;
use evalflow_worker::config::Config;
use evalflow_workflow::{Attempt, Event, Evidence, JobId, RunId, job_name};

use crate::backend::Backend;

/// Prints the job of `run`'s `attempt` (the latest when `None`).
pub fn print(config: &Config, run: &RunId, attempt: Option<u32>) -> Result<()> {
    let attempt = match attempt {
        Some(n) => Attempt(n),
        None => latest_attempt(config, run)?,
    };
    let paths = JobPaths::new(&config.jobs_dir(), &job_name(run, attempt));
    if !paths.dir().exists() {
        bail!("run {run} has no job for attempt {attempt} in {}", config.jobs_dir().display());
    }
    println!("job {} ({})", job_name(run, attempt), paths.dir().display());
    match paths.read_status()? {
        Some(status) => {
            println!("ended: {}", status.outcome);
            if let Some(note) = &status.note {
                println!("note: {}", printable(note));
            }
            print_evidence(&status.evidence);
            if let Some(peak) = status.usage.peak_memory_mib {
                println!("peak memory: {peak} MiB");
            }
        }
        None if paths.supervised()? => println!("running"),
        None => println!("not running, and no status: its supervisor is gone"),
    }
    println!("--- stdout (last 4 KiB) ---\n{}", printable(&tail(&paths.stdout())));
    println!("--- stderr (last 4 KiB) ---\n{}", printable(&tail(&paths.stderr())));
    Ok(())
}

/// Prints, on AWS, how the job of `run`'s `attempt` (the latest when
/// `None`) ended and the end of its CloudWatch Logs stream.
pub async fn print_aws(config: &Config, backend: &Backend, run: &RunId, attempt: Option<u32>) -> Result<()> {
    let history = backend.call(History { run: run.clone() }).await?;
    let latest = history.iter().filter_map(|e| job_of(&e.data).map(|(attempt, _)| attempt.0)).max();
    let Some(attempt) = attempt.or(latest).map(Attempt) else { bail!("run {run} has no job yet") };
    let mut job = None;
    let mut ended = None;
    for entry in &history {
        match &entry.data {
            Event::JobLaunched { attempt: a, job: j } if *a == attempt => job = Some(j.clone()),
            Event::JobEnded { attempt: a, job: j, outcome, evidence, .. } if *a == attempt => {
                job = Some(j.clone());
                ended = Some((outcome.clone(), evidence.clone()));
            }
            _ => {}
        }
    }
    let Some(job) = job else { bail!("run {run} has no job for attempt {attempt}") };
    println!("job {job} (attempt {attempt} of run {run})");
    let (logs, batch) = evalflow_worker::aws::log_readers(config).await?;
    let recorded = ended.as_ref().and_then(|(_, evidence)| evidence.log_stream.as_ref().map(|s| s.to_string()));
    match &ended {
        Some((outcome, evidence)) => {
            println!("ended: {outcome}");
            print_evidence(evidence);
        }
        None => println!("running"),
    }
    let stream = match recorded {
        Some(stream) => Some(stream),
        None => stream_of(&batch, job.as_str()).await?,
    };
    let Some(stream) = stream else {
        println!("no log stream yet: AWS Batch names one when the job's container starts");
        return Ok(());
    };
    let lines = logs.tail(&stream).await?;
    println!(
        "--- {LOG_GROUP} {stream} (the newest {} events; at most {TAIL_EVENTS} events, {} KiB) ---",
        lines.len(),
        TAIL_BYTES_MAX / 1024
    );
    for line in lines {
        println!("{}", printable(&line.message));
    }
    Ok(())
}

/// The attempt and job an event names, if it names a job.
fn job_of(event: &Event) -> Option<(Attempt, &JobId)> {
    match event {
        Event::JobLaunched { attempt, job } | Event::JobEnded { attempt, job, .. } => Some((*attempt, job)),
        _ => None,
    }
}

/// The evidence for a job's end, one fact a line; job-written text made printable.
fn print_evidence(evidence: &Evidence) {
    if let Some(words) = evidence.words() {
        println!("evidence: {}", printable(&words));
    }
    let facts = [
        ("exit code", evidence.exit_code.map(|c| c.to_string())),
        ("signal", evidence.signal.map(|s| s.to_string())),
        ("status reason", evidence.status_reason.as_ref().map(|r| printable(r.as_str()))),
        ("log stream", evidence.log_stream.as_ref().map(|s| printable(s.as_str()))),
    ];
    for (name, value) in facts {
        if let Some(value) = value {
            println!("{name}: {value}");
        }
    }
}

fn latest_attempt(config: &Config, run: &RunId) -> Result<Attempt> {
    let prefix = format!("{}-a", job_name(run, Attempt(0)).trim_end_matches("-a0"));
    let mut latest = None;
    if let Ok(entries) = fs::read_dir(config.jobs_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_prefix(&prefix).and_then(|n| n.parse::<u32>().ok()) {
                latest = latest.max(Some(n));
            }
        }
    }
    match latest {
        Some(n) => Ok(Attempt(n)),
        None => bail!("run {run} has no job yet in {}", config.jobs_dir().display()),
    }
}

/// `text` without what a terminal would act on: escape sequences (CSI, OSC,
/// DCS, ...: parsed by `vte`, the terminal parser of Alacritty, so that a
/// sequence's parameters go with it), every other C0 and C1 control and DEL,
/// and the Unicode controls that reorder how a line reads (bidirectional
/// overrides and isolates). Newlines and tabs stay. A carriage return
/// becomes a newline (a `\r\n` one newline): a progress bar's redraws then
/// show as lines, and no text can be hidden by printing over it.
pub fn printable(text: &str) -> String {
    let mut kept = Printable { text: String::with_capacity(text.len()), after_cr: false };
    vte::Parser::new().advance(&mut kept, text.as_bytes());
    kept.text
}

/// What [`printable`] keeps, as the parser finds it.
struct Printable {
    text: String,
    /// Whether the last thing seen was a carriage return.
    after_cr: bool,
}

impl vte::Perform for Printable {
    fn print(&mut self, c: char) {
        let reorders = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if !c.is_control() && !reorders {
            self.text.push(c);
        }
        self.after_cr = false;
    }

    fn execute(&mut self, byte: u8) {
        match byte {
            b'\n' if self.after_cr => {}
            b'\n' | b'\r' => self.text.push('\n'),
            b'\t' => self.text.push('\t'),
            _ => {}
        }
        self.after_cr = byte == b'\r';
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn escape_sequences_and_controls_are_dropped() {
        let hostile = [
            ("\x1b]0;pwned title\x07after", "after"), // OSC set title, BEL-terminated
            ("\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\", "link"), // OSC 8 hyperlink, ST-terminated
            ("a\x1b[2Jb\x1b[1;1Hc", "abc"),           // clear screen, cursor home
            ("\x1b[31mred\x1b[0m", "red"),            // colours
            ("x\x1bcy", "xy"),                        // RIS: reset the terminal
            ("bell\x07", "bell"),                     // bare BEL
            ("8-bit \u{9b}2J csi", "8-bit 2J csi"),   // C1 CSI: its parameters are left as text
            ("\x1bP1$qm\x1b\\dcs", "dcs"),            // DCS
            ("del\x7f nul\0 bs\x08", "del nul bs"),
            ("user \u{202e}gnp.exe", "user gnp.exe"), // right-to-left override
        ];
        for (input, expected) in hostile {
            assert_eq!(printable(input), expected, "{input:?}");
        }
    }

    #[test]
    fn text_newlines_and_tabs_stay_and_returns_become_newlines() {
        assert_eq!(printable("a\tb\nc — ünïcode ✓\n"), "a\tb\nc — ünïcode ✓\n");
        assert_eq!(printable("10%\r50%\r100%\r\ndone\r\n"), "10%\n50%\n100%\ndone\n");
        assert_eq!(printable("secret\rpublic"), "secret\npublic", "nothing is printed over");
    }

    #[test]
    fn nothing_a_terminal_acts_on_survives_random_bytes() {
        // Every byte value, in every position of a short sequence.
        for a in 0..=255u8 {
            for b in [0x1b, 0x07, 0x9b, b'[', b'\r', b'x'] {
                let text = String::from_utf8_lossy(&[a, b, a, b'q']).into_owned();
                let shown = printable(&text);
                assert!(shown.chars().all(|c| !c.is_control() || c == '\n' || c == '\t'), "{text:?} -> {shown:?}");
            }
        }
    }
}
