//! Reading text files whatever their encoding: UTF-8 (with or without BOM), or
//! else Windows-1252/Latin-1, which is what older Gutenberg files use. Line ends
//! are normalised to `\n`.

use std::path::Path;

use crate::DataError;

/// How a file's bytes were decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Utf8,
    /// Not valid UTF-8: every byte read as its Latin-1 code point.
    Latin1,
}

/// Reads a text file, decodes it, drops a leading BOM and turns `\r\n`/`\r` into `\n`.
pub fn read_text(path: &Path) -> Result<(String, Encoding), DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(decode_text(&bytes))
}

/// [`read_text`] on bytes already in memory.
pub fn decode_text(bytes: &[u8]) -> (String, Encoding) {
    let (text, encoding) = match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_owned(), Encoding::Utf8),
        Err(_) => (bytes.iter().map(|&b| b as char).collect(), Encoding::Latin1),
    };
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(&text);
    (text.replace("\r\n", "\n").replace('\r', "\n"), encoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_bom_crlf_and_latin1() {
        assert_eq!(decode_text(b"\xEF\xBB\xBFa\r\nb\rc").0, "a\nb\nc");
        let (text, encoding) = decode_text(b"caf\xE9\r\n");
        assert_eq!((text.as_str(), encoding), ("caf\u{e9}\n", Encoding::Latin1));
    }
}
