//! Scoring: check a `submission.csv` against the competition's rules, then
//! compute its binary log loss against the private labels.
//!
//! Every broken rule is a specific [`Rejection`] naming the line and the
//! value, where Kaggle says only "Submission Scoring Error".

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{Cursor, SeekFrom};

use evalflow_workflow::Score;
use serde::{Deserialize, Serialize};

use crate::artifacts::{Labels, Predictions};
use crate::untrusted::Refusal;

/// Probabilities are clipped to `[EPSILON, 1 - EPSILON]` before the logarithm.
pub const EPSILON: f64 = 1e-15;

/// The largest `submission.csv` scored, in bytes.
pub const PREDICTIONS_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// A `submission.csv` that breaks a rule. Lines count from 1, the header included.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// No file.
    #[error("Submission CSV Not Found: the job ended without writing submission.csv to $EVALFLOW_OUTPUT_DIR")]
    NotFound,
    /// Not a file that can be scored (a link, a FIFO, a hard link).
    #[error("submission.csv {why}")]
    Refused {
        /// What it is.
        why: Refusal,
    },
    /// Too big to score.
    #[error("submission.csv has more than {PREDICTIONS_MAX_BYTES} bytes (at least {bytes}): write a smaller file")]
    TooLarge {
        /// Its size.
        bytes: u64,
    },
    /// Nothing in it.
    #[error("submission.csv is empty: write the header filename,label and one row per test file")]
    Empty,
    /// Not the expected header.
    #[error("line 1: the header is {found:?}; it must be exactly filename,label")]
    BadHeader {
        /// The header found.
        found: String,
    },
    /// Not CSV.
    #[error("line {line}: {problem}")]
    Malformed {
        /// The line.
        line: u64,
        /// What the CSV reader said.
        problem: String,
    },
    /// A row without exactly two fields.
    #[error("line {line}: {found} fields; each row must be filename,label")]
    FieldCount {
        /// The line.
        line: u64,
        /// Fields found.
        found: usize,
    },
    /// A file that is not in the test set.
    #[error("line {line}: {filename:?} is not a file of the test set")]
    UnknownFile {
        /// The line.
        line: u64,
        /// The file named.
        filename: String,
    },
    /// A file predicted twice.
    #[error("line {line}: {filename:?} is predicted again (first on line {first_line})")]
    DuplicateFile {
        /// The line.
        line: u64,
        /// The file named.
        filename: String,
        /// Where it was first predicted.
        first_line: u64,
    },
    /// A value that is not a finite number.
    #[error("line {line}: label {value:?} is not a number between 0 and 1")]
    NotANumber {
        /// The line.
        line: u64,
        /// The value found.
        value: String,
    },
    /// A probability outside [0, 1].
    #[error("line {line}: label {value} is outside [0, 1]")]
    OutOfRange {
        /// The line.
        line: u64,
        /// The value found.
        value: f64,
    },
    /// Test files without a prediction.
    #[error("{missing} test files have no row, for example {example:?}")]
    MissingFiles {
        /// How many.
        missing: usize,
        /// One of them.
        example: String,
    },
}

/// Checks the predictions and scores them against `labels`.
pub fn score(predictions: &Predictions, labels: &Labels) -> Result<Score, Rejection> {
    let predicted = checked(predictions, labels)?;
    let pairs = predicted.iter().map(|(file, (probability, _))| (*probability, labels.is_fake(file).unwrap_or(false)));
    Score::new(log_loss(pairs)).ok_or(Rejection::Empty)
}

/// How an audit run's predictions differ from its original's, row by row.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Test files compared (every labelled one).
    pub rows: usize,
    /// The largest difference between the two probabilities of one file.
    pub max_abs_difference: f64,
    /// The file where it is largest, as its row in the labels (from 0).
    pub worst_row: usize,
}

/// Compares two runs' predictions of the same stage, each checked as
/// [`score`] checks it.
pub fn compare(original: &Predictions, audit: &Predictions, labels: &Labels) -> Result<Comparison, Rejection> {
    let (original, audit) = (checked(original, labels)?, checked(audit, labels)?);
    let mut comparison = Comparison { rows: 0, max_abs_difference: 0.0, worst_row: 0 };
    for (row, file) in labels.files().enumerate() {
        let (Some((a, _)), Some((b, _))) = (original.get(file), audit.get(file)) else { continue };
        let difference = (a - b).abs();
        if difference > comparison.max_abs_difference {
            comparison.max_abs_difference = difference;
            comparison.worst_row = row;
        }
        comparison.rows += 1;
    }
    Ok(comparison)
}

/// The predictions' rows, every labelled file present exactly once.
fn checked<'a>(predictions: &Predictions, labels: &'a Labels) -> Result<BTreeMap<&'a str, (f64, u64)>, Rejection> {
    let bytes = match predictions {
        Predictions::Missing => return Err(Rejection::NotFound),
        Predictions::Refused(why) => return Err(Rejection::Refused { why: *why }),
        Predictions::TooLarge { bytes } => return Err(Rejection::TooLarge { bytes: *bytes }),
        Predictions::Found(bytes) => bytes,
    };
    let predicted = parse(bytes, labels)?;
    if predicted.len() < labels.len() {
        let example = labels.files().find(|f| !predicted.contains_key(*f)).unwrap_or_default().to_owned();
        return Err(Rejection::MissingFiles { missing: labels.len() - predicted.len(), example });
    }
    Ok(predicted)
}

thread_local! {
    /// A reader for each thread that scores: making one builds its parser's
    /// state machine, which took about a tenth of scoring small predictions
    /// (the benchmark's ten rows). Each use starts it afresh on new bytes.
    static READER: RefCell<csv::Reader<Cursor<Vec<u8>>>> = RefCell::new(reader());
}

/// A reader whose headers are set (empty), so that starting it afresh never
/// reads a file's first row into them, where it would stay for the thread's
/// life (up to 16 MiB of one team's predictions).
fn reader() -> csv::Reader<Cursor<Vec<u8>>> {
    let mut reader =
        csv::ReaderBuilder::new().has_headers(false).flexible(true).trim(csv::Trim::All).from_reader(Cursor::default());
    reader.set_byte_headers(csv::ByteRecord::new());
    reader
}

/// Parses the rows: file -> (probability, line).
fn parse<'a>(bytes: &[u8], labels: &'a Labels) -> Result<BTreeMap<&'a str, (f64, u64)>, Rejection> {
    READER.with_borrow_mut(|reader| {
        *reader.get_mut() = Cursor::new(bytes.to_vec());
        // Forgets where the last file ended (and any half-read record).
        let parsed = match reader.seek_raw(SeekFrom::Start(0), csv::Position::new()) {
            Ok(()) => rows(reader, labels),
            Err(e) => Err(Rejection::Malformed { line: 1, problem: e.to_string() }),
        };
        // A thread keeps no predictions (up to 16 MiB) between scorings.
        *reader.get_mut() = Cursor::default();
        parsed
    })
}

/// The rows of the file `reader` starts.
fn rows<'a>(
    reader: &mut csv::Reader<Cursor<Vec<u8>>>,
    labels: &'a Labels,
) -> Result<BTreeMap<&'a str, (f64, u64)>, Rejection> {
    let mut records = reader.records();
    let header = match records.next() {
        None => return Err(Rejection::Empty),
        Some(Err(e)) => return Err(Rejection::Malformed { line: 1, problem: e.to_string() }),
        Some(Ok(header)) => header,
    };
    if header.iter().collect::<Vec<_>>() != ["filename", "label"] {
        return Err(Rejection::BadHeader { found: header.iter().collect::<Vec<_>>().join(",") });
    }
    let mut predicted = BTreeMap::new();
    for record in records {
        let record = record
            .map_err(|e| Rejection::Malformed { line: e.position().map_or(0, |p| p.line()), problem: e.to_string() })?;
        let line = record.position().map_or(0, |p| p.line());
        let [filename, value] = record.iter().collect::<Vec<_>>()[..] else {
            return Err(Rejection::FieldCount { line, found: record.len() });
        };
        let Some(file) = labels.file(filename) else {
            return Err(Rejection::UnknownFile { line, filename: filename.to_owned() });
        };
        let probability = value
            .parse::<f64>()
            .ok()
            .filter(|p| p.is_finite())
            .ok_or_else(|| Rejection::NotANumber { line, value: value.to_owned() })?;
        if !(0.0..=1.0).contains(&probability) {
            return Err(Rejection::OutOfRange { line, value: probability });
        }
        if let Some((_, first_line)) = predicted.insert(file, (probability, line)) {
            return Err(Rejection::DuplicateFile { line, filename: filename.to_owned(), first_line });
        }
    }
    Ok(predicted)
}

/// Binary log loss of (probability of FAKE, is FAKE) pairs, natural log,
/// probabilities clipped to [`EPSILON`]; NaN for no pairs.
pub fn log_loss(pairs: impl IntoIterator<Item = (f64, bool)>) -> f64 {
    let (mut total, mut count) = (0.0, 0_u32);
    for (probability, fake) in pairs {
        let p = probability.clamp(EPSILON, 1.0 - EPSILON);
        total += if fake { p.ln() } else { (1.0 - p).ln() };
        count += 1;
    }
    -total / f64::from(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Labels {
        Labels::parse(b"filename,label\na.mp4,1\nb.mp4,0\nc.mp4,1\n", "labels.csv").unwrap()
    }

    fn scored(csv: &str) -> Result<Score, Rejection> {
        score(&Predictions::Found(csv.as_bytes().to_vec()), &labels())
    }

    #[test]
    fn an_audit_is_compared_row_by_row_whatever_the_order() {
        let found = |csv: &str| Predictions::Found(csv.as_bytes().to_vec());
        let original = found("filename,label\na.mp4,0.9\nb.mp4,0.2\nc.mp4,0.3\n");
        let same = found("filename,label\nc.mp4,0.3\na.mp4,0.9\nb.mp4,0.2\n");
        let drifted = found("filename,label\na.mp4,0.9\nb.mp4,0.25\nc.mp4,0.2999\n");
        let exact = compare(&original, &same, &labels()).unwrap();
        assert_eq!(exact, Comparison { rows: 3, max_abs_difference: 0.0, worst_row: 0 });
        let off = compare(&original, &drifted, &labels()).unwrap();
        assert_eq!((off.rows, off.worst_row), (3, 1));
        assert!((off.max_abs_difference - 0.05).abs() < 1e-12, "{off:?}");
        let short = found("filename,label\na.mp4,0.9\n");
        assert!(matches!(compare(&original, &short, &labels()), Err(Rejection::MissingFiles { missing: 2, .. })));
    }

    #[test]
    fn log_loss_matches_the_formula() {
        let expected = -((0.9_f64).ln() + (0.8_f64).ln() + (0.3_f64).ln()) / 3.0;
        let got = scored("filename,label\na.mp4,0.9\nb.mp4,0.2\nc.mp4,0.3\n").unwrap().value();
        assert!((got - expected).abs() < 1e-12, "{got} != {expected}");
    }

    #[test]
    fn certain_and_wrong_is_clipped_not_infinite() {
        let got = scored("filename,label\na.mp4,0\nb.mp4,1\nc.mp4,0\n").unwrap().value();
        let expected = -(2.0 * EPSILON.ln() + (1.0 - (1.0 - EPSILON)).ln()) / 3.0;
        assert!((got - expected).abs() < 1e-9, "{got} != {expected}");
        assert!(got.is_finite() && got > 34.0);
    }

    #[test]
    fn order_and_whitespace_do_not_matter() {
        let a = scored("filename,label\na.mp4,0.9\nb.mp4,0.2\nc.mp4,0.3\n").unwrap();
        let b = scored("filename , label\r\nc.mp4, 0.3\r\nb.mp4 ,0.2\r\na.mp4,0.9\r\n").unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn each_broken_rule_is_its_own_rejection() {
        let cases: [(&str, Rejection); 9] = [
            ("", Rejection::Empty),
            ("file,prob\na.mp4,0.5\n", Rejection::BadHeader { found: "file,prob".into() }),
            ("filename,label\na.mp4,0.5,1\n", Rejection::FieldCount { line: 2, found: 3 }),
            ("filename,label\nz.mp4,0.5\n", Rejection::UnknownFile { line: 2, filename: "z.mp4".into() }),
            (
                "filename,label\na.mp4,0.5\na.mp4,0.6\n",
                Rejection::DuplicateFile { line: 3, filename: "a.mp4".into(), first_line: 2 },
            ),
            ("filename,label\na.mp4,\n", Rejection::NotANumber { line: 2, value: String::new() }),
            ("filename,label\na.mp4,nan\n", Rejection::NotANumber { line: 2, value: "nan".into() }),
            ("filename,label\na.mp4,1.5\n", Rejection::OutOfRange { line: 2, value: 1.5 }),
            ("filename,label\na.mp4,0.5\nc.mp4,0.5\n", Rejection::MissingFiles { missing: 1, example: "b.mp4".into() }),
        ];
        for (csv, expected) in cases {
            assert_eq!(scored(csv).unwrap_err(), expected, "{csv:?}");
        }
        assert_eq!(score(&Predictions::Missing, &labels()).unwrap_err(), Rejection::NotFound);
        let big = Predictions::TooLarge { bytes: PREDICTIONS_MAX_BYTES + 1 };
        assert!(matches!(score(&big, &labels()), Err(Rejection::TooLarge { .. })));
        assert!(matches!(
            scored("\"unterminated\na.mp4,1\n"),
            Err(Rejection::Malformed { .. } | Rejection::BadHeader { .. })
        ));
    }

    #[test]
    fn each_file_is_read_from_its_own_start_whatever_the_last_one_left() {
        // Each stops the reader part-way: a record cut by EOF in a quote, a bad value.
        assert!(scored("filename,label\na.mp4,0.5\n\"b.mp4,0.").is_err());
        assert_eq!(
            scored("filename,label\na.mp4,0.5\nb.mp4,x\nc.mp4,0.5\n").unwrap_err(),
            Rejection::NotANumber { line: 3, value: "x".into() }
        );
        assert_eq!(scored("filename,label\nb.mp4,2\n").unwrap_err(), Rejection::OutOfRange { line: 2, value: 2.0 });
        assert_eq!(scored(""), Err(Rejection::Empty));
        assert!(scored("filename,label\na.mp4,0.9\nb.mp4,0.2\nc.mp4,0.3\n").is_ok());
        // Nothing of them is kept: no bytes, no row taken for headers.
        READER.with_borrow_mut(|reader| {
            assert!(reader.get_ref().get_ref().is_empty());
            assert!(reader.byte_headers().unwrap().is_empty());
        });
    }

    #[test]
    fn rejections_read_as_instructions() {
        let e = Rejection::OutOfRange { line: 7, value: 1.5 };
        assert_eq!(e.to_string(), "line 7: label 1.5 is outside [0, 1]");
        assert_eq!(
            Rejection::NotFound.to_string(),
            "Submission CSV Not Found: the job ended without writing submission.csv to $EVALFLOW_OUTPUT_DIR"
        );
    }
}
