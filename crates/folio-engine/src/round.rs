//! One round's bookkeeping: who was asked, who answered, who left, and whether
//! the round may close. A round closes only with at least the quorum of updates.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use folio_fed::Encoding;
use folio_proto::RoundStart;

/// Where the open round stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundPhase {
    /// No round open.
    Idle,
    /// Still waiting for updates.
    Collecting,
    /// Every selected client reported or left, and the quorum reported.
    Complete,
    /// The deadline passed with at least a quorum of updates.
    DeadlineWithQuorum,
    /// The quorum can no longer be reached (deadline passed, or too many left).
    Failed,
}

pub(crate) struct OpenRound {
    pub round: u64,
    /// Attempts of this round number before this one (abandoned for no quorum).
    pub attempt: u32,
    pub selected: BTreeSet<u64>,
    pub reported: BTreeSet<u64>,
    /// Selected sessions whose connection ended before they reported.
    pub dropped: BTreeSet<u64>,
    /// The most examples each selected session can have trained on.
    pub allowed_examples: BTreeMap<u64, u64>,
    /// The delta encoding the round takes.
    pub encoding: Encoding,
    /// What the selected clients were sent (weights included), for a client that
    /// rejoins before it reported.
    pub start: RoundStart,
    /// What the round collected so far.
    pub(crate) collected: crate::jobs::Collected,
    pub deadline: Instant,
    pub started: Instant,
    pub loss_sum: f64,
    pub accuracy_sum: f64,
    pub examples: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// A secure round's steps (`None`: a plain round).
    pub(crate) secure: Option<Box<crate::secure::SecureOpen>>,
}

impl OpenRound {
    /// `start` sent at `now` to the sessions in `allowed_examples` (with the most
    /// examples each may report), due `deadline` later.
    pub fn new(
        start: RoundStart,
        attempt: u32,
        allowed_examples: BTreeMap<u64, u64>,
        collected: crate::jobs::Collected,
        now: Instant,
        deadline: Duration,
    ) -> Self {
        Self {
            round: start.round,
            attempt,
            selected: allowed_examples.keys().copied().collect(),
            reported: BTreeSet::new(),
            dropped: BTreeSet::new(),
            allowed_examples,
            encoding: start.delta_encoding,
            start,
            collected,
            deadline: now + deadline,
            started: now,
            loss_sum: 0.0,
            accuracy_sum: 0.0,
            examples: 0,
            bytes_up: 0,
            bytes_down: 0,
            secure: None,
        }
    }

    fn waiting(&self) -> usize {
        self.selected.len() - self.reported.len() - self.dropped.len()
    }

    pub fn phase(&self, quorum: usize, now: Instant) -> RoundPhase {
        let reported = self.reported.len();
        let waiting = self.waiting();
        if reported + waiting < quorum {
            return RoundPhase::Failed;
        }
        if waiting == 0 {
            return RoundPhase::Complete;
        }
        if now < self.deadline {
            return RoundPhase::Collecting;
        }
        if reported >= quorum {
            RoundPhase::DeadlineWithQuorum
        } else {
            RoundPhase::Failed
        }
    }

    /// Whether `session` is selected and still expected to report (it may be
    /// silent while it trains).
    pub fn is_training(&self, session: u64) -> bool {
        self.selected.contains(&session)
            && !self.reported.contains(&session)
            && !self.dropped.contains(&session)
    }

    /// Selected sessions that did not deliver.
    pub fn failed(&self) -> impl Iterator<Item = u64> + '_ {
        self.selected.difference(&self.reported).copied()
    }

    pub fn seconds_left(&self, now: Instant) -> Duration {
        self.deadline.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use folio_fed::StrategyConfig;

    fn round(selected: &[u64]) -> OpenRound {
        let strategy = folio_fed::strategy::build(
            StrategyConfig::fedavg(3),
            &folio_fed::StrategyContext::seeded(0),
        );
        let start = RoundStart {
            round: 1,
            model: 0,
            weights: Some(Vec::new()),
            weights_encoding: Encoding::F32,
            deadline_ms: 60_000,
            local_epochs: 1,
            max_batches: None,
            optimizer: folio_proto::Optimizer::Sgd,
            learning_rate: 0.1,
            clip_norm: None,
            delta_encoding: Encoding::F32,
            seed: 0,
            secure: None,
        };
        OpenRound::new(
            start,
            0,
            selected.iter().map(|&s| (s, 8)).collect(),
            crate::jobs::Collected::Updates(
                strategy.open_round(&strategy.initial_state(1), 1).unwrap(),
            ),
            Instant::now(),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn a_round_never_closes_below_the_quorum() {
        let now = Instant::now();
        let mut open = round(&[1, 2, 3]);
        assert_eq!(open.phase(2, now), RoundPhase::Collecting);
        open.reported.insert(1);
        open.dropped.insert(2);
        assert_eq!(open.phase(2, now), RoundPhase::Collecting);
        // The last one that could make the quorum leaves: failed, not closed with 1.
        open.dropped.insert(3);
        assert_eq!(open.phase(2, now), RoundPhase::Failed);
        let mut open = round(&[1, 2, 3]);
        open.reported.extend([1, 2]);
        assert_eq!(open.phase(2, now), RoundPhase::Collecting);
        assert_eq!(
            open.phase(2, now + Duration::from_secs(61)),
            RoundPhase::DeadlineWithQuorum
        );
        open.reported.insert(3);
        assert_eq!(open.phase(2, now), RoundPhase::Complete);
        let mut open = round(&[1, 2, 3]);
        open.reported.insert(1);
        assert_eq!(
            open.phase(2, now + Duration::from_secs(61)),
            RoundPhase::Failed
        );
        assert_eq!(open.failed().collect::<Vec<_>>(), vec![2, 3]);
    }
}
