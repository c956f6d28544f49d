//! Free text kept in a record (an error, a reason, a log line): bounded,
//! with no control characters or reordering marks.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest free-text detail kept in a record (error messages, reasons), in bytes.
pub const DETAIL_MAX_LEN: usize = 2048;

/// Free text of bounded size (an error message, a rejection reason).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Detail(String);

impl Detail {
    /// Keeps at most [`DETAIL_MAX_LEN`] bytes of `text`, cut at a character
    /// boundary, without control characters or the Unicode marks that
    /// reorder a line (a job's words could carry terminal escapes to an
    /// operator's screen, or make a line read otherwise than it is).
    pub fn new(text: impl Into<String>) -> Detail {
        let mut text: String = text.into();
        let hostile = |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if text.chars().any(hostile) {
            text = text.chars().map(|c| if hostile(c) { ' ' } else { c }).collect();
        }
        if text.len() > DETAIL_MAX_LEN {
            let mut cut = DETAIL_MAX_LEN - 3;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("...");
        }
        Detail(text)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detail_keeps_no_escapes_nor_reordering_marks() {
        let hostile = "torch.OutOfMemoryError\x1b]0;owned\x07: CUDA \u{202e}gnp.exe\u{2066} out of memory\r\n";
        assert_eq!(Detail::new(hostile).as_str(), "torch.OutOfMemoryError ]0;owned : CUDA  gnp.exe  out of memory  ");
        let long = Detail::new("é".repeat(DETAIL_MAX_LEN));
        assert!(long.as_str().len() <= DETAIL_MAX_LEN && long.as_str().ends_with("..."));
    }
}
