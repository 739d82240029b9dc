//! The pre-training corpus: Project Gutenberg books with their licence header and
//! footer stripped.

use std::path::{Path, PathBuf};

use crate::DataError;
use crate::text::read_text;

/// The Dickens books shipped in the repository (Gutenberg ebooks 98 and 46).
pub fn default_dickens_files(repo_root: &Path) -> Vec<PathBuf> {
    ["a-tale-of-two-cities.txt", "a-christmas-carol.txt"]
        .iter()
        .map(|name| repo_root.join("data/dickens").join(name))
        .collect()
}

/// Lines that open a Gutenberg footer (older files put the "End of" line first).
const END_MARKERS: [&str; 3] = [
    "*** END OF",
    "End of the Project Gutenberg",
    "End of Project Gutenberg",
];

/// The body of a Gutenberg text: what lies between the `*** START OF` marker line
/// and the footer. Text without markers is returned whole.
pub fn strip_gutenberg(text: &str) -> &str {
    let start = text
        .find("*** START OF")
        .and_then(|at| text[at..].find('\n').map(|nl| at + nl + 1))
        .unwrap_or(0);
    let end = END_MARKERS
        .iter()
        .filter_map(|marker| text[start..].find(marker))
        .min()
        .map_or(text.len(), |at| start + at);
    text[start..end].trim_matches('\n')
}

/// Reads the books and returns their bodies, one string per book.
pub fn load_books(paths: &[PathBuf]) -> Result<Vec<String>, DataError> {
    if paths.is_empty() {
        return Err(DataError::NoCorpusFiles);
    }
    paths
        .iter()
        .map(|path| {
            let (text, _) = read_text(path)?;
            let body = strip_gutenberg(&text);
            if body.trim().is_empty() {
                return Err(DataError::EmptyText { path: path.clone() });
            }
            Ok(body.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_header_and_footer() {
        let text = "Licence\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nBody.\n\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence";
        assert_eq!(strip_gutenberg(text), "Body.");
        assert_eq!(strip_gutenberg("no markers"), "no markers");
    }

    #[test]
    fn loads_the_shipped_books() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let books = load_books(&default_dickens_files(&root)).unwrap();
        assert_eq!(books.len(), 2);
        for book in &books {
            assert!(!book.contains("Gutenberg"), "licence text left in");
            assert!(!book.contains('\r') && !book.starts_with('\u{FEFF}'));
        }
        assert!(books[0].contains("It was the best of times"));
        assert!(books[1].contains("MARLEY was dead: to begin with."));
    }
}
