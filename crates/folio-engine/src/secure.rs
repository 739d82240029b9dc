//! Secure rounds in the engine: the steps of `folio_secagg`'s protocol with
//! their deadlines, and the round's sum, unmasked and decoded off the engine
//! into the share a strategy combines (as a cluster's root combines edges').

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use folio_fed::{FedError, Partial};
use folio_proto::{ErrorCode, ServerMessage};
use folio_secagg::{SecureServer, SecureSpec, Unmasking};

use crate::engine::Phase;
use crate::error::EngineError;
use crate::roles::{HoldsSessions, Role};
use crate::{Engine, SecureRounds};

/// The secure side of an open round.
pub(crate) struct SecureOpen {
    pub server: SecureServer,
    pub spec: SecureSpec,
    /// When the step under way stops waiting.
    pub step_deadline: Instant,
    /// Set once the unmasking step closed: the round's sum, still masked.
    pub unmasking: Option<Unmasking>,
    /// Sessions that left during the round: no later step waits for them.
    pub left: BTreeSet<u64>,
    /// When the step under way began.
    pub step_started: Instant,
}

/// A secure round that closed with its sum, and who is in it.
pub(crate) struct ClosedSum {
    pub sum: SecureSum,
    pub contributors: Vec<u64>,
}

impl SecureOpen {
    /// The round's sum, if its unmasking step closed.
    pub fn into_sum(self) -> Option<ClosedSum> {
        let unmasking = self.unmasking?;
        Some(ClosedSum {
            contributors: self.server.contributors(),
            sum: SecureSum {
                unmasking,
                spec: self.spec,
            },
        })
    }
}

/// The spec of secure round `id`, quantised by `quantizer`; weighted by
/// examples (each client's over `weight_scale`) or uniformly (`None`).
fn spec(
    id: u64,
    settings: &SecureRounds,
    quantizer: folio_secagg::Quantizer,
    weight_scale: Option<u64>,
) -> SecureSpec {
    let clients = quantizer.clients as usize;
    SecureSpec {
        id,
        threshold: settings
            .threshold
            .unwrap_or_else(|| folio_secagg::graph::majority(clients, settings.degree as usize)),
        degree: settings.degree,
        quantizer,
        weight_scale,
    }
}

/// How long a secure step waits for its last few: once at most one in ten
/// (at least one) of those it waits for is missing, as long again as the step
/// has taken (at least a second), so one silent client costs a round seconds,
/// not the step's timeout. A client that slow is a dropout.
fn stragglers_until(secure: &SecureOpen, now: Instant) -> Instant {
    let (answered, of) = secure.server.progress();
    let missing = of - answered;
    if missing == 0 || missing > (of / 10).max(1) {
        return secure.step_deadline;
    }
    let taken = now.saturating_duration_since(secure.step_started);
    now + taken.max(Duration::from_secs(1))
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of `x`.
fn splitmix(x: u64) -> u64 {
    let x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A secure round's sum, to unmask and decode where it holds nothing up.
pub(crate) struct SecureSum {
    pub unmasking: Unmasking,
    pub spec: SecureSpec,
}

/// What the decoded sum says besides the weighted deltas.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SumMetrics {
    pub loss_sum: f64,
    pub accuracy_sum: f64,
    pub weight: f64,
    /// Σ examples, where clients are weighted by them.
    pub examples: u64,
    /// Σ of the devices' figures on their held-out text (a round that also
    /// evaluates on the devices), for the model the round started from.
    pub held_out: folio_secagg::HeldOut,
}

impl SecureSum {
    /// The sum as a share: Σ w·clip(Δ) with Σ w; refused if it could not come
    /// from clipped inputs (a client that sent values out of range).
    pub fn partial(&self) -> Result<(Partial, SumMetrics), FedError> {
        let sum = self
            .spec
            .quantizer
            .decode(&self.unmasking.run())
            .map_err(|e| FedError::Secure(e.to_string()))?;
        let contributors = self.unmasking.contributors();
        let bound = f64::from(self.spec.quantizer.clip_bound);
        let norm = folio_fed::robust::l2_norm(&sum.weighted_delta);
        // Each client adds at most w·S (plus rounding): the sum's norm is at
        // most Σw·S, and Σw at most one per client. The devices' noise under
        // distributed DP adds its norm, σ·√d, and far less than 8σ more.
        let dims = sum.weighted_delta.len() as f64;
        let noise = self.spec.quantizer.noise_std(contributors) * (dims.sqrt() + 8.0);
        let rounding = 1e-3 * bound * contributors as f64 + 1e-6;
        let slack = rounding + noise;
        // Each device's held-out figures are at most its characters (its loss
        // at most 16 nats each), its characters at most the cap.
        let held_out = sum.held_out;
        let most_chars = (contributors as u64 * self.spec.quantizer.held_out_chars) as f64;
        let within = |value: f64, most: f64| (-1.0..=most + 1.0).contains(&value);
        // No coordinate beyond what the inputs at their bound and eight
        // standard deviations of the noise make: a client cannot hide a large
        // value in one coordinate behind the noise's norm.
        let largest = sum
            .weighted_delta
            .iter()
            .fold(0f64, |m, v| m.max(f64::from(v.abs())));
        let reach = sum.weight * bound + 8.0 * self.spec.quantizer.noise_std(contributors);
        let plausible = sum.weight.is_finite()
            && sum.weight > 0.0
            && sum.weight <= contributors as f64 + 1e-6
            && norm <= sum.weight * bound + slack
            && largest <= reach + rounding
            && within(held_out.chars, most_chars)
            && within(held_out.correct, held_out.chars)
            && within(
                held_out.loss_sum,
                held_out.chars * folio_secagg::quantize::LOSS_RANGE,
            );
        if !plausible {
            return Err(FedError::Secure(format!(
                "the unmasked sum cannot come from clipped inputs (weight {:.3} of {contributors} clients, norm {norm:.4} over bound {bound}): a client sent values out of range",
                sum.weight
            )));
        }
        let examples = match self.spec.weight_scale {
            Some(scale) => (sum.weight * scale as f64).round() as u64,
            None => 0,
        };
        let metrics = SumMetrics {
            loss_sum: sum.weighted_loss,
            accuracy_sum: sum.weighted_accuracy,
            weight: sum.weight,
            examples,
            held_out: sum.held_out,
        };
        let partial = Partial {
            sum: sum.weighted_delta,
            total_weight: sum.weight,
            updates: contributors,
            norms: Vec::new(),
        };
        Ok((partial, metrics))
    }
}

/// What a device is told to add under distributed DP `plan`.
pub fn device_noise(plan: &folio_fed::DeviceNoisePlan) -> folio_secagg::quantize::DeviceNoise {
    folio_secagg::quantize::DeviceNoise {
        scaled_bound: plan.scaled_bound,
        rounded_bound: plan.rounded_bound,
        variance: plan.variance,
    }
}

impl<R: Role> Engine<R> {
    /// The bound a secure round's clients clip to (`None` for plain rounds).
    pub(crate) fn secure_bound(
        &self,
        ordered: Result<Option<f32>, FedError>,
    ) -> Result<Option<f32>, EngineError> {
        if self.config.rounds.secure.is_none() {
            return Ok(None);
        }
        match ordered {
            Ok(Some(bound)) => Ok(Some(bound)),
            Ok(None) => Err(EngineError::new(
                ErrorCode::BadSecureStep,
                "a secure round needs a fixed clip bound",
            )),
            Err(err) => Err(EngineError::new(
                ErrorCode::BadSecureStep,
                format!("a secure round cannot start: {err}"),
            )),
        }
    }

    /// The secure side of a round for the sessions in `allowed_examples`, its
    /// spec and masking graph drawn fresh.
    pub(crate) fn open_secure(
        &mut self,
        round: u64,
        settings: &SecureRounds,
        allowed_examples: &BTreeMap<u64, u64>,
        bound: f32,
        now: Instant,
    ) -> Result<Box<SecureOpen>, folio_secagg::SecAggError> {
        let strategy = &self.config.rounds.strategy;
        let by_examples = strategy.weighting == folio_fed::Weighting::Examples
            && strategy.kind != folio_fed::StrategyKind::DpFedAvg;
        let most = allowed_examples.values().copied().max().unwrap_or(1);
        // One server also has the devices measure the round's starting model,
        // summed with the round, when federated evaluation is due.
        let held_out_chars = self
            .config
            .rounds
            .federated_eval
            .filter(|f| R::HOLDS_SESSIONS && R::COMMITS && f.due(round))
            .map_or(0, |f| f.max_chars);
        let id = self.draw_u64();
        let quantizer = folio_secagg::Quantizer {
            clients: allowed_examples.len() as u32,
            clip_bound: bound,
            held_out_chars,
            noise: self.device_noise.as_ref().map(device_noise),
        };
        let spec = spec(id, settings, quantizer, by_examples.then_some(most.max(1)));
        let graph_seed = self.draw_seed();
        let sessions = allowed_examples.keys().copied();
        let server = SecureServer::new(spec, self.config.num_params(), sessions, graph_seed)?;
        Ok(Box::new(SecureOpen {
            server,
            spec,
            step_deadline: now + settings.step_timeout,
            unmasking: None,
            left: BTreeSet::new(),
            step_started: now,
        }))
    }

    /// Moves a secure round along: its step closes once every client it waits
    /// for answered or left, or at the step's deadline. Returns whether the
    /// round changed (and may move again).
    pub(crate) fn step_secure(&mut self, now: Instant) -> bool {
        let quorum = self.quorum();
        // Distributed DP's noise is planned for this many inputs at least.
        let noise_inputs = self.device_noise.map_or(0, |plan| plan.min_inputs);
        let (step_timeout, min_cohort) = self
            .config
            .rounds
            .secure
            .map_or((Duration::ZERO, 0), |s| (s.step_timeout, s.min_cohort));
        let Phase::Collecting(open) = &mut self.phase else {
            return false;
        };
        let Some(secure) = &mut open.secure else {
            return false;
        };
        if !secure.server.is_complete() && now < secure.step_deadline {
            return false;
        }
        // Those that checked the shares and sent no input while connected
        // held the round up to its straggler wait: a strike each.
        let silent: Vec<u64> = match secure.server.stage() {
            folio_secagg::Stage::Masked => secure
                .server
                .awaiting()
                .filter(|s| !secure.left.contains(s))
                .collect(),
            _ => Vec::new(),
        };
        self.strike(&silent, now, "sent no masked input in time");
        let Phase::Collecting(open) = &mut self.phase else {
            unreachable!("matched above")
        };
        let secure = open.secure.as_mut().expect("matched above");
        // Nothing is revealed of fewer inputs than the quorum and the minimum
        // cohort: checked before any unmasking request goes out.
        let inputs = secure.server.contributors().len();
        let required = quorum.max(min_cohort).max(noise_inputs);
        if secure.server.stage() == folio_secagg::Stage::Masked && inputs < required {
            let why =
                format!("has {inputs} masked inputs, under the {required} a sum is revealed of");
            if quorum == 0 {
                tracing::warn!(round = open.round, "a secure round closes empty: it {why}");
                open.secure = None;
                open.reported.clear();
                self.close_round();
                return false;
            }
            self.abandon_round(&why);
            return true;
        }
        match secure.server.close() {
            Ok(folio_secagg::Closed::Send(messages)) => {
                // Training happens before the masked input: that step waits
                // until the round's deadline, the others for the step timeout.
                secure.step_deadline = match secure.server.stage() {
                    folio_secagg::Stage::Masked => open.deadline,
                    _ => now + step_timeout,
                };
                secure.step_started = now;
                for &session in &secure.left {
                    secure.server.leave(session);
                }
                let culprits = match secure.server.stage() {
                    folio_secagg::Stage::Masked => secure.server.culprits(),
                    _ => Vec::new(),
                };
                for (session, step) in messages {
                    self.send(vec![session], ServerMessage::Secure(step));
                }
                self.strike(
                    &culprits,
                    now,
                    "spoiled a secure round's share or accused a neighbour falsely",
                );
                self.send(
                    culprits,
                    EngineError::new(
                        ErrorCode::BadSecureStep,
                        "a share you sealed did not open for its holder (or you said a good one did not): you are out of this round",
                    ),
                );
                true
            }
            Ok(folio_secagg::Closed::Unmask(unmasking)) => {
                secure.unmasking = Some(unmasking);
                self.close_round();
                false
            }
            // Rounds that close with whatever came (DP-FedAvg's, whose sample
            // must never be drawn again; an edge's share) close with nothing.
            Err(why) if quorum == 0 => {
                tracing::warn!(round = open.round, "a secure round closes empty: {why}");
                open.secure = None;
                open.reported.clear();
                self.close_round();
                false
            }
            Err(why) => {
                self.abandon_round(&why.to_string());
                true
            }
        }
    }
}

impl<R: Role> Engine<R> {
    /// A secure sum was decoded (`plausible`) or refused as no clipped inputs
    /// could make it. No one can tell whose input spoiled it, so each of its
    /// contributors is suspected, for 10 s doubling with each refused sum in a
    /// row; a good sum clears it. The spoiler is in every refused sum, so its
    /// suspicion grows and lasts while an honest client's is soon cleared.
    pub(crate) fn judge_contributors(
        &mut self,
        contributors: &[u64],
        plausible: bool,
        now: Instant,
    ) {
        for &session in contributors {
            if let Some(info) = self.sessions.get_mut(session) {
                if plausible {
                    info.suspicion.clear();
                } else {
                    info.suspicion.add(now);
                }
            }
        }
    }

    /// A secure round's candidates, the least suspected first: those under
    /// no suspicion if there are enough of them for a round, else topped up
    /// with the least suspected (ties drawn by the round's seed). DP rounds
    /// keep every candidate: their sample must stay the Poisson one.
    pub(crate) fn least_suspected(
        &self,
        candidates: Vec<folio_fed::Candidate>,
        round: u64,
        now: Instant,
    ) -> Vec<folio_fed::Candidate> {
        let strategy = self.strategy.config();
        if self.config.rounds.secure.is_none() || self.is_dp() {
            return candidates;
        }
        let suspicion = |c: &folio_fed::Candidate| {
            self.sessions
                .get(c.client)
                .and_then(|s| s.suspicion.benched_until(now).map(|_| s.suspicion.count()))
                .unwrap_or(0)
        };
        let (clean, mut suspected): (Vec<_>, Vec<_>) =
            candidates.into_iter().partition(|c| suspicion(c) == 0);
        let wanted = strategy.min_clients.max(1);
        if clean.len() >= wanted {
            return clean;
        }
        let seed = self.strategy.seed() ^ round.rotate_left(32) ^ u64::from(self.attempt);
        let tie = |c: &folio_fed::Candidate| splitmix(seed ^ c.client);
        suspected.sort_by_key(|c| (suspicion(c), tie(c)));
        let top_up = wanted - clean.len();
        clean
            .into_iter()
            .chain(suspected.into_iter().take(top_up))
            .collect()
    }
}

impl<R: HoldsSessions> Engine<R> {
    /// Takes one step of a secure round from `session`, or says why not; a
    /// refused step changes nothing.
    pub fn secure(
        &mut self,
        session: u64,
        step: folio_secagg::ClientStep,
        now: Instant,
    ) -> Result<(), EngineError> {
        let Phase::Collecting(open) = &mut self.phase else {
            return Err(EngineError::new(
                ErrorCode::RoundClosed,
                "no round is open; the secure step is ignored",
            ));
        };
        let Some(secure) = &mut open.secure else {
            return Err(EngineError::new(
                ErrorCode::BadSecureStep,
                format!("round {} is not secure", open.round),
            ));
        };
        let masked = matches!(step, folio_secagg::ClientStep::Masked(_));
        secure
            .server
            .receive(session, step)
            .map_err(|e| EngineError::new(ErrorCode::BadSecureStep, e.to_string()))?;
        secure.step_deadline = secure.step_deadline.min(stragglers_until(secure, now));
        if masked {
            open.reported.insert(session);
            if let Some(info) = self.sessions.get_mut(session) {
                info.contributed(open.round);
            }
        }
        self.advance(now);
        Ok(())
    }
}
