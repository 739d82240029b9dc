//! A device's own text: read from a file or a folder of `.txt` files, and split
//! into the part it trains on and the part it holds out for federated
//! evaluation, the way the simulation splits a character's speeches (the first
//! [`TRAIN_FRACTION`] trains, the rest is held out).

use std::path::Path;

use crate::DataError;
use crate::shakespeare::TRAIN_FRACTION;
use crate::text::read_text;

/// Bytes of text a device may bring at most (a novel is ≈ 1 MB).
pub const MAX_DEVICE_TEXT_BYTES: usize = 64 * 1024 * 1024;

/// A device's text, split by lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceText {
    pub train: String,
    pub held_out: String,
}

impl DeviceText {
    /// The first lines holding [`TRAIN_FRACTION`] of the characters train, the
    /// rest is held out. A text of one line trains whole, and holds nothing out.
    pub fn split(text: &str) -> Self {
        let total = text.chars().count();
        let wanted = (total as f64 * TRAIN_FRACTION).ceil() as usize;
        let mut seen = 0;
        let mut cut = text.len();
        for (at, c) in text.char_indices() {
            seen += 1;
            if c == '\n' && seen >= wanted {
                cut = at;
                break;
            }
        }
        let (train, rest) = text.split_at(cut);
        Self {
            train: train.to_owned(),
            held_out: rest.strip_prefix('\n').unwrap_or(rest).to_owned(),
        }
    }
}

/// The text at `path`: a file, or every `.txt` file of a folder (in name order,
/// joined by newlines). Any encoding [`read_text`] reads; empty text is refused.
pub fn read_device_text(path: &Path) -> Result<String, DataError> {
    let io = |source| DataError::Io {
        path: path.to_owned(),
        source,
    };
    let files = if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .map_err(io)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "txt"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    let mut text = String::new();
    for file in &files {
        let (part, _) = read_text(file)?;
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&part);
        if text.len() > MAX_DEVICE_TEXT_BYTES {
            return Err(DataError::DeviceTextTooLarge {
                path: path.to_owned(),
            });
        }
    }
    if text.trim().is_empty() {
        return Err(DataError::EmptyDeviceText {
            path: path.to_owned(),
        });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_a_line_after_the_train_fraction() {
        let text = (0..10)
            .map(|i| format!("line {i}"))
            .collect::<Vec<_>>()
            .join("\n");
        let split = DeviceText::split(&text);
        assert_eq!(split.train.lines().count(), 8, "{split:?}");
        assert_eq!(split.held_out, "line 8\nline 9");
        assert_eq!(format!("{}\n{}", split.train, split.held_out), text);
        let one = DeviceText::split("one line only");
        assert_eq!(
            (one.train.as_str(), one.held_out.as_str()),
            ("one line only", "")
        );
        let empty = DeviceText::split("");
        assert!(empty.train.is_empty() && empty.held_out.is_empty());
    }

    #[test]
    fn reads_a_file_or_a_folder_of_text_files_and_refuses_none() {
        let dir = std::env::temp_dir().join(format!("folio-device-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("b.txt"), "second\r\n").unwrap();
        std::fs::write(dir.join("a.txt"), b"caf\xe9").unwrap();
        std::fs::write(dir.join("notes.md"), "not text of the device").unwrap();
        assert_eq!(read_device_text(&dir).unwrap(), "café\nsecond\n");
        assert_eq!(read_device_text(&dir.join("b.txt")).unwrap(), "second\n");
        std::fs::write(dir.join("blank.txt"), " \n").unwrap();
        assert!(matches!(
            read_device_text(&dir.join("blank.txt")),
            Err(DataError::EmptyDeviceText { .. })
        ));
        let missing = read_device_text(&dir.join("missing.txt")).unwrap_err();
        assert!(missing.to_string().contains("missing.txt"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
