//! The figures `folio data stats` prints.

use std::fmt;

use crate::batch::{BatchConfig, batch_count};
use crate::shakespeare::Corpus;
use crate::vocab::{EncodeStats, encode};

#[derive(Debug, Clone, PartialEq)]
pub struct CorpusStats {
    pub plays: usize,
    pub clients: usize,
    pub dropped_clients: usize,
    pub dropped_lines: usize,
    pub train_speeches: usize,
    pub test_speeches: usize,
    pub train_chars: usize,
    pub test_chars: usize,
    /// Train + test chars of a client: (min, median, max).
    pub chars_per_client: (usize, usize, usize),
    /// Clients with at least one full tutorial batch of training data.
    pub clients_with_full_batch: usize,
    /// Clients the tutorial's drop-remainder batching leaves without a batch.
    pub clients_lost_dropping: usize,
    /// Clients the padded variant leaves without a batch.
    pub clients_lost_padding: usize,
    pub encoding: EncodeStats,
}

impl CorpusStats {
    pub fn of(corpus: &Corpus) -> Self {
        let tutorial = BatchConfig::tutorial(0);
        let padded = BatchConfig::padded(0);
        let mut per_client = Vec::with_capacity(corpus.clients.len());
        let mut stats = Self {
            plays: corpus.plays.len(),
            clients: corpus.clients.len(),
            dropped_clients: corpus.dropped_clients,
            dropped_lines: corpus.plays.iter().map(|p| p.dropped_lines).sum(),
            train_speeches: 0,
            test_speeches: 0,
            train_chars: 0,
            test_chars: 0,
            chars_per_client: (0, 0, 0),
            clients_with_full_batch: 0,
            clients_lost_dropping: 0,
            clients_lost_padding: 0,
            encoding: EncodeStats::default(),
        };
        for client in &corpus.clients {
            let (train, train_enc) = encode(&client.train_text());
            let (test, test_enc) = encode(&client.test_text());
            stats.encoding.add(train_enc);
            stats.encoding.add(test_enc);
            stats.train_speeches += client.train.len();
            stats.test_speeches += client.test.len();
            stats.train_chars += train.len();
            stats.test_chars += test.len();
            per_client.push(train.len() + test.len());
            let full = batch_count(train.len(), &tutorial);
            stats.clients_with_full_batch += usize::from(full > 0);
            stats.clients_lost_dropping += usize::from(full == 0);
            stats.clients_lost_padding += usize::from(batch_count(train.len(), &padded) == 0);
        }
        per_client.sort_unstable();
        if let (Some(&min), Some(&max)) = (per_client.first(), per_client.last()) {
            stats.chars_per_client = (min, per_client[per_client.len() / 2], max);
        }
        stats
    }
}

impl fmt::Display for CorpusStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (min, median, max) = self.chars_per_client;
        let enc = &self.encoding;
        writeln!(f, "plays                      {}", self.plays)?;
        writeln!(f, "clients (2+ speeches)      {}", self.clients)?;
        writeln!(f, "speakers dropped (<2)      {}", self.dropped_clients)?;
        writeln!(f, "lines with no speaker      {}", self.dropped_lines)?;
        writeln!(
            f,
            "train speeches / chars     {} / {}",
            self.train_speeches, self.train_chars
        )?;
        writeln!(
            f,
            "test speeches / chars      {} / {}",
            self.test_speeches, self.test_chars
        )?;
        writeln!(
            f,
            "chars per client           min {min}, median {median}, max {max}"
        )?;
        writeln!(
            f,
            "clients with a full batch  {} (8 x 101 train chars)",
            self.clients_with_full_batch
        )?;
        writeln!(
            f,
            "clients with no batch      {} dropping the remainder (tutorial), {} padded",
            self.clients_lost_dropping, self.clients_lost_padding
        )?;
        write!(
            f,
            "out of vocabulary          {:.4}% ({} folded to ASCII, {} unknown -> id 0, of {} chars)",
            100.0 * enc.out_of_vocab_rate(),
            enc.folded,
            enc.unknown,
            enc.chars
        )
    }
}
