//! Diagnostics for files people write (recipes, values, environments): errors
//! at `file:line:col`, TOML parsed with positions, and did-you-mean for misspelt keys.

use std::fmt;
use std::path::PathBuf;

/// A problem located in a file: `file:line:col: message`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FileError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for FileError {}

/// One file's text, kept to point at its lines.
pub(crate) struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

impl SourceFile {
    /// Read a file (the error names it).
    pub(crate) fn read(path: &std::path::Path) -> anyhow::Result<SourceFile> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(SourceFile {
            path: path.to_path_buf(),
            text,
        })
    }

    /// The position of byte `offset`, for values checked later.
    pub(crate) fn pos(&self, span: std::ops::Range<usize>) -> crate::image::values::Pos {
        crate::image::values::Pos::at(&self.path, &self.text, span.start)
    }

    pub(crate) fn error_at(
        &self,
        span: std::ops::Range<usize>,
        message: impl Into<String>,
    ) -> FileError {
        let (line, column) = line_col(&self.text, span.start);
        FileError {
            file: self.path.clone(),
            line,
            column,
            message: message.into(),
        }
    }

    /// Parse the whole file as TOML into `T` (whose structs deny unknown
    /// fields); errors point at the culprit and suggest the key meant.
    pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(&self) -> Result<T, FileError> {
        toml::from_str::<T>(&self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            self.error_at(span, explain_toml_error(e.message()))
        })
    }
}

/// Turn serde's "unknown field `x`, expected one of ..." into a sentence with
/// a did-you-mean suggestion; other messages pass through.
pub(crate) fn explain_toml_error(message: &str) -> String {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((key, tail)) = rest.split_once('`') {
            let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
            let mut out = format!("unknown key `{key}`");
            if let Some(best) = did_you_mean(key, &expected) {
                out.push_str(&format!(" (did you mean `{best}`?)"));
            } else if !expected.is_empty() {
                out.push_str(&format!(" (expected one of: {})", expected.join(", ")));
            }
            return out;
        }
    }
    message.replace('\n', " ")
}

/// 1-based line and column of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

/// The closest candidate to a misspelt key, if one is close enough.
pub(crate) fn did_you_mean<'a>(key: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(key, c), *c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
