//! The tutorial's fixed 86-character vocabulary and the text → id encoding.
//!
//! Out-of-vocabulary policy, applied per char in this order:
//! 1. a byte-order mark is dropped (it is an encoding artefact, not text);
//! 2. typographic chars fold to their ASCII form (curly quotes → `'`/`"`, dashes →
//!    `-`, `…` → `...`, non-breaking space and tab → space, braces → parentheses)
//!    and accented Latin letters fold to their base letter (`é` → `e`, `Æ` → `AE`);
//! 3. anything still outside the vocabulary maps to id 0, as TFF's tutorial does.
//!
//! Steps 2 and 3 are counted in [`EncodeStats`]. The file loaders turn `\r\n` and
//! `\r` into `\n` before encoding, so id 85 (`\r`) only comes from in-memory text.

/// The vocabulary in the tutorial's exact order: a char's id is its position.
pub const VOCAB: &str =
    "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r";

/// Number of chars in [`VOCAB`].
pub const VOCAB_SIZE: usize = 86;

/// The id unknown chars map to (the tutorial's choice).
pub const UNKNOWN_ID: u32 = 0;

const _: () = assert!(VOCAB.len() == VOCAB_SIZE);

/// ASCII char → id, built at compile time from [`VOCAB`].
const ASCII_TO_ID: [Option<u8>; 128] = {
    let mut table = [None; 128];
    let bytes = VOCAB.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        table[bytes[i] as usize] = Some(i as u8);
        i += 1;
    }
    table
};

/// Counts of what the encoder had to change.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EncodeStats {
    /// Chars seen (after BOM removal), i.e. chars in the source text.
    pub chars: u64,
    /// Chars folded to an ASCII form inside the vocabulary.
    pub folded: u64,
    /// Chars with no vocabulary form, mapped to [`UNKNOWN_ID`].
    pub unknown: u64,
}

impl EncodeStats {
    pub fn add(&mut self, other: EncodeStats) {
        self.chars += other.chars;
        self.folded += other.folded;
        self.unknown += other.unknown;
    }

    /// Fraction of chars that were not in the vocabulary as written.
    pub fn out_of_vocab_rate(&self) -> f64 {
        if self.chars == 0 {
            0.0
        } else {
            (self.folded + self.unknown) as f64 / self.chars as f64
        }
    }
}

/// Id of an in-vocabulary char.
pub fn char_to_id(c: char) -> Option<u32> {
    if c.is_ascii() {
        ASCII_TO_ID[c as usize].map(u32::from)
    } else {
        None
    }
}

/// Char of an id; `None` above the vocabulary.
pub fn id_to_char(id: u32) -> Option<char> {
    VOCAB.as_bytes().get(id as usize).map(|&b| b as char)
}

/// ASCII replacement of a char outside the vocabulary, if it has one.
pub fn fold(c: char) -> Option<&'static str> {
    Some(match c {
        '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{2032}' | '\u{00B4}' | '`' => "'",
        '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{2033}' | '\u{00AB}' | '\u{00BB}' => "\"",
        '\u{2010}' | '\u{2011}' | '\u{2012}' | '\u{2013}' | '\u{2014}' | '\u{2015}' => "-",
        '\u{2026}' => "...",
        '\u{00A0}' | '\u{2009}' | '\u{202F}' | '\t' => " ",
        '{' => "(",
        '}' => ")",
        'À' | 'Á' | 'Â' | 'Ã' | 'Ä' | 'Å' => "A",
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' => "a",
        'Æ' => "AE",
        'æ' => "ae",
        'Ç' => "C",
        'ç' => "c",
        'È' | 'É' | 'Ê' | 'Ë' => "E",
        'è' | 'é' | 'ê' | 'ë' => "e",
        'Ì' | 'Í' | 'Î' | 'Ï' => "I",
        'ì' | 'í' | 'î' | 'ï' => "i",
        'Ñ' => "N",
        'ñ' => "n",
        'Ò' | 'Ó' | 'Ô' | 'Õ' | 'Ö' | 'Ø' => "O",
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' => "o",
        'Œ' => "OE",
        'œ' => "oe",
        'Ù' | 'Ú' | 'Û' | 'Ü' => "U",
        'ù' | 'ú' | 'û' | 'ü' => "u",
        'Ý' | 'Ÿ' => "Y",
        'ý' | 'ÿ' => "y",
        'ß' => "ss",
        _ => return None,
    })
}

/// Encodes text to ids under the module's out-of-vocabulary policy.
pub fn encode(text: &str) -> (Vec<u32>, EncodeStats) {
    let mut ids = Vec::with_capacity(text.len());
    let mut stats = EncodeStats::default();
    for c in text.chars().filter(|&c| c != '\u{FEFF}') {
        stats.chars += 1;
        if let Some(id) = char_to_id(c) {
            ids.push(id);
        } else if let Some(ascii) = fold(c) {
            stats.folded += 1;
            ids.extend(ascii.chars().map(|a| char_to_id(a).unwrap_or(UNKNOWN_ID)));
        } else {
            stats.unknown += 1;
            ids.push(UNKNOWN_ID);
        }
    }
    (ids, stats)
}

/// Decodes ids to text; ids outside the vocabulary become `U+FFFD`.
pub fn decode(ids: &[u32]) -> String {
    ids.iter()
        .map(|&id| id_to_char(id).unwrap_or('\u{FFFD}'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_matches_the_tutorial_order() {
        assert_eq!(VOCAB.chars().count(), 86);
        assert_eq!(char_to_id('d'), Some(0));
        assert_eq!(char_to_id(' '), Some(13));
        assert_eq!(char_to_id('\n'), Some(62));
        assert_eq!(char_to_id('\r'), Some(85));
        assert_eq!(id_to_char(85), Some('\r'));
        assert_eq!(id_to_char(86), None);
        let unique: std::collections::HashSet<char> = VOCAB.chars().collect();
        assert_eq!(unique.len(), 86, "vocabulary has duplicate chars");
    }

    #[test]
    fn ascii_round_trips() {
        let text = "I thought the King had more affected the Duke of Albany than\nCornwall.";
        let (ids, stats) = encode(text);
        assert_eq!(decode(&ids), text);
        assert_eq!(stats.chars, text.len() as u64);
        assert_eq!(stats.out_of_vocab_rate(), 0.0);
    }

    #[test]
    fn folds_typography_and_accents_and_counts_unknowns() {
        let (ids, stats) = encode("\u{FEFF}\u{201C}Café\u{201D}\u{2014}ok… ☃");
        assert_eq!(decode(&ids), "\"Cafe\"-ok... d");
        assert_eq!(stats.folded, 5);
        assert_eq!(stats.unknown, 1);
        assert_eq!(stats.chars, 12);
    }
}
