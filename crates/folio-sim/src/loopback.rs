//! The whole system on one machine: the real aggregator on a loopback port and
//! N native clients, each on a thread of its own, speaking WebSocket to it.

use std::time::Duration;

use anyhow::Context;
use burn::prelude::Device;
use folio_client::ClientOptions;
use folio_client::native::WsTransport;
use folio_engine::RoundRecord;
use folio_server::{Server, ServerConfig};

/// Runs `config.max_rounds` rounds with `clients` native clients; `committed`
/// sees each round as it is committed. Returns the history, from round 0.
pub fn run(
    config: ServerConfig,
    clients: usize,
    mut committed: impl FnMut(&RoundRecord),
) -> anyhow::Result<Vec<RoundRecord>> {
    let rounds = config
        .max_rounds
        .context("a loopback run needs its rounds")?;
    anyhow::ensure!(
        clients >= config.rounds.strategy.min_clients,
        "{clients} clients can never start a round that needs {}",
        config.rounds.strategy.min_clients
    );
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let server = Server::start(config)
            .await
            .context("starting the aggregator")?;
        let url = format!("ws://{}/ws", server.addr);
        let mut threads: Vec<_> = (0..clients)
            .map(|_| {
                let url = url.clone();
                // Training is CPU work: each client gets its own thread and runtime.
                std::thread::spawn(move || -> anyhow::Result<()> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async {
                        let mut transport = WsTransport::connect(&url).await?;
                        let options = ClientOptions::native();
                        folio_client::run(&mut transport, &Device::flex(), &options, |_| {})
                            .await?;
                        Ok(())
                    })
                })
            })
            .collect();
        let mut shown = 0;
        while shown <= rounds as usize {
            let history = server.history();
            for record in &history[shown.min(history.len())..] {
                committed(record);
            }
            shown = history.len();
            if let Some(finished) = threads.iter().position(|t| t.is_finished())
                && shown <= rounds as usize
            {
                let outcome = threads.swap_remove(finished).join();
                let why = match outcome {
                    Ok(Err(err)) => format!("{err:#}"),
                    Ok(Ok(())) => "the server closed its connection".to_owned(),
                    Err(_) => "it panicked".to_owned(),
                };
                anyhow::bail!("a client stopped before the last round: {why}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let history = server.history();
        server.shutdown().await;
        anyhow::Ok(history)
    })
}
