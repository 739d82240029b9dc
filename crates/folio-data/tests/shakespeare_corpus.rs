//! Tests on the real corpus (fetched by `scripts/setup.sh data` into data/cache,
//! or wherever FOLIO_DATA_DIR points).

use std::path::Path;
use std::sync::OnceLock;

use folio_data::batch::{batch_count, batches};
use folio_data::shakespeare::train_len;
use folio_data::stats::CorpusStats;
use folio_data::{BatchConfig, Corpus, vocab};

fn corpus() -> &'static Corpus {
    static CORPUS: OnceLock<Corpus> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let data_dir = folio_data::data_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
        Corpus::load(&data_dir.join("shakespeare")).unwrap_or_else(|err| panic!("{err}"))
    })
}

fn kent() -> &'static folio_data::Client {
    corpus().client("THE_TRAGEDY_OF_KING_LEAR_KENT").unwrap()
}

#[test]
fn kents_first_training_speech() {
    assert!(
        kent().train[0].starts_with("I thought the King had more affected the Duke of Albany than"),
        "{:?}",
        kent().train[0]
    );
}

#[test]
fn corpus_is_large_enough_that_no_speeches_are_lost() {
    let stats = CorpusStats::of(corpus());
    assert_eq!(stats.plays, 37, "36 First Folio plays plus Pericles");
    assert!(stats.clients >= 900, "{stats}");
    assert!(stats.clients_with_full_batch >= 500, "{stats}");
    assert!(stats.train_chars + stats.test_chars > 4_000_000, "{stats}");
}

#[test]
fn client_texts_hold_no_stage_directions_headings_or_speaker_lines() {
    let corpus = corpus();
    let mut offending = Vec::new();
    for client in &corpus.clients {
        let speaker_lines: Vec<String> = corpus
            .clients
            .iter()
            .filter(|other| other.play == client.play)
            .map(|other| format!("{}.", other.speaker))
            .collect();
        for speech in client.train.iter().chain(&client.test) {
            let lines: Vec<&str> = speech.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                let direction = line.contains(['[', ']', '{', '}']);
                let heading = line.starts_with("ACT ") || line.starts_with("SCENE");
                // A name may close a speech (a letter's signature, as in All's Well),
                // but a missed speaker line would have speech after it.
                let speaker_line = speaker_lines.iter().any(|s| s == line) && i + 1 < lines.len();
                if direction || heading || speaker_line {
                    offending.push(format!("{}: {line:?}", client.id));
                }
            }
        }
    }
    assert!(offending.is_empty(), "{}", offending.join("\n"));
}

#[test]
fn split_is_temporal() {
    let corpus = corpus();
    for client in &corpus.clients {
        let play = corpus
            .plays
            .iter()
            .find(|p| p.title == client.play)
            .unwrap();
        let in_order: Vec<&str> = play
            .speeches
            .iter()
            .filter(|s| folio_data::shakespeare::client_id(&play.title, &s.speaker) == client.id)
            .map(|s| s.text.as_str())
            .collect();
        let split: Vec<&str> = client
            .train
            .iter()
            .chain(&client.test)
            .map(String::as_str)
            .collect();
        assert_eq!(in_order, split, "{}", client.id);
        assert_eq!(
            client.train.len(),
            train_len(in_order.len()),
            "{}",
            client.id
        );
        assert!(!client.test.is_empty(), "{}", client.id);
    }
}

#[test]
fn tutorial_batches_have_the_tutorial_shapes_and_are_seeded() {
    let (ids, _) = vocab::encode(&kent().train_text());
    let config = BatchConfig::tutorial(42);
    let all = batches(&ids, &config);
    assert!(!all.is_empty());
    for batch in &all {
        assert_eq!((batch.batch_size, batch.seq_len), (8, 100));
        assert_eq!((batch.inputs.len(), batch.targets.len()), (800, 800));
        assert_eq!(batch.real_targets(), 800);
        for row in 0..8 {
            let r = row * 100..(row + 1) * 100;
            assert_eq!(
                batch.inputs[r.start + 1..r.end],
                batch.targets[r.start..r.end - 1]
            );
        }
    }
    // Every batch row is a 101-id window of the text.
    let row = &all[0];
    let window: Vec<u32> = row.inputs[..100]
        .iter()
        .chain(&row.targets[99..100])
        .copied()
        .collect();
    assert!(ids.windows(101).any(|w| w == window.as_slice()));
    assert_eq!(all, batches(&ids, &BatchConfig::tutorial(42)));
    assert_ne!(all, batches(&ids, &BatchConfig::tutorial(43)));
}

#[test]
fn padded_variant_keeps_every_client() {
    for client in &corpus().clients {
        let (ids, _) = vocab::encode(&client.train_text());
        let padded = batches(&ids, &BatchConfig::padded(0));
        assert!(!padded.is_empty(), "{} lost", client.id);
        let targets: usize = padded.iter().map(|b| b.real_targets()).sum();
        assert_eq!(
            targets,
            ids.len() - ids.len().div_ceil(101),
            "{}",
            client.id
        );
        assert_eq!(
            padded.len(),
            batch_count(ids.len(), &BatchConfig::padded(0))
        );
    }
}
