//! What a model file says of where it comes from, in its metadata: the privacy
//! its run spent (`dp_*`) and the budget it took (`budget_*`).

use std::collections::BTreeMap;

use folio_engine::RoundRecord;

/// The privacy guarantee a model file carries in its metadata (`dp_*`, written
/// by `folio export` from a DP-FedAvg run), in one line.
pub fn privacy_line(metadata: &BTreeMap<String, String>) -> Option<String> {
    let get = |key: &str| metadata.get(&format!("dp_{key}")).map(String::as_str);
    // Files from before distributed DP name no mechanism: the server's.
    let noise = match get("noise") {
        Some("devices") => "the devices' Skellam noise",
        _ => "the server's Gaussian noise",
    };
    Some(format!(
        "differentially private: (ε = {}, δ = {}) after {} rounds of ~{} clients (Poisson, q = {} of {}), noise multiplier {} ({noise}), clip bound {}",
        get("epsilon")?,
        get("delta")?,
        get("rounds")?,
        get("expected_clients")?,
        get("sampling_rate")?,
        get("population")?,
        get("noise_multiplier")?,
        get("clip_bound")?,
    ))
}

/// `privacy` (a DP-FedAvg state's `privacy` value) as model metadata.
pub fn privacy_metadata(privacy: &folio_fed::PrivacySpent) -> BTreeMap<String, String> {
    [
        ("epsilon", format!("{:.4}", privacy.epsilon)),
        ("delta", format!("{:.3e}", privacy.delta)),
        ("rounds", privacy.rounds.to_string()),
        ("expected_clients", format!("{}", privacy.expected_clients)),
        ("sampling_rate", format!("{:.6}", privacy.sampling_rate)),
        ("population", privacy.population.to_string()),
        ("noise_multiplier", privacy.noise_multiplier.to_string()),
        ("clip_bound", privacy.clip_bound.to_string()),
        (
            "noise",
            if privacy.distributed {
                "devices"
            } else {
                "server"
            }
            .to_owned(),
        ),
    ]
    .into_iter()
    .map(|(key, value)| (format!("dp_{key}"), value))
    .collect()
}

/// What training the model cost: client updates, the characters they trained
/// on (for runs that recorded them), and the bytes both ways.
pub fn budget_metadata(history: &[RoundRecord]) -> BTreeMap<String, String> {
    let sum = |f: fn(&RoundRecord) -> u64| history.iter().map(f).sum::<u64>();
    let mut budget = BTreeMap::from([
        (
            "budget_client_updates".to_owned(),
            sum(|r| r.clients as u64).to_string(),
        ),
        (
            "budget_bytes_up".to_owned(),
            sum(|r| r.bytes_up).to_string(),
        ),
        (
            "budget_bytes_down".to_owned(),
            sum(|r| r.bytes_down).to_string(),
        ),
    ]);
    // Runs from before rounds recorded their examples leave it out.
    if history.iter().skip(1).all(|r| r.examples > 0) {
        let characters = sum(|r| r.examples) * folio_data::batch::SEQ_LEN as u64;
        budget.insert(
            "budget_characters_trained".to_owned(),
            characters.to_string(),
        );
    }
    budget
}
