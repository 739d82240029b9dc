//! A secure round on the client: answers each server step, trains once the
//! shares are in (while the server checks them), and masks the update once the
//! server has named who is out.

use burn::prelude::Device;
use folio_proto::{ClientMessage, RoundStart};
use folio_secagg::{ClientStep, HeldOut, SecureClient, ServerStep};

use crate::{
    ClientError, ClientEvent, ClientState, HeldModel, LocalResult, RoundReport, Session, Transport,
    codec, evaluate, train_round,
};

/// A secure round this client is in: its protocol state, the round's start
/// and model, and what it trained, until it is masked.
pub(crate) struct SecureRound {
    pub client: SecureClient,
    pub start: RoundStart,
    pub model: HeldModel,
    pub bytes_down: usize,
    pub trained: Option<(LocalResult, HeldOut)>,
}

/// Sends one step of a secure round.
pub(crate) async fn send_step<T: Transport>(
    transport: &mut T,
    step: ClientStep,
) -> Result<usize, ClientError> {
    let frame = folio_proto::encode(&ClientMessage::Secure(step));
    let bytes = frame.len();
    transport.send(frame).await?;
    Ok(bytes)
}

/// Answers one server step of a secure round: shares for the roster; for the
/// relayed shares, the check of them, then training; once the server names
/// who is out, the masked input (the round's report); the revealed shares for
/// the unmasking request.
pub(crate) async fn secure_step<T: Transport>(
    transport: &mut T,
    device: &Device,
    session: &Session,
    round: &mut SecureRound,
    step: ServerStep,
    on_event: &mut impl FnMut(ClientEvent),
) -> Result<Option<RoundReport>, ClientError> {
    let number = round.start.round;
    match step {
        ServerStep::Roster(roster) => {
            let shares = round.client.roster(roster)?;
            on_event(ClientEvent::State(ClientState::Securing {
                round: number,
                step: "shares",
            }));
            send_step(transport, ClientStep::Shares(shares)).await?;
            Ok(None)
        }
        ServerStep::Shares(shares) => {
            let check = round.client.shares(shares)?;
            send_step(transport, ClientStep::Check(check)).await?;
            let local = train_round(device, session, &round.start, &round.model, on_event).await?;
            // The round also evaluates on the devices: the model it was sent,
            // on the text this device holds out, summed with the round's.
            let held_out = match round.client.spec().quantizer.held_out_chars {
                0 => HeldOut::default(),
                most => {
                    let num_params = [session.config.num_params()];
                    let model = &round.model;
                    let weights = codec::decode(&model.weights, &num_params, model.encoding)?;
                    let ids = &session.held_out;
                    evaluate::held_out_figures(device, session.config, &weights, ids, most).await?
                }
            };
            round.trained = Some((local, held_out));
            on_event(ClientEvent::State(ClientState::Securing {
                round: number,
                step: "check",
            }));
            Ok(None)
        }
        ServerStep::Proceed(proceed) => {
            round.client.proceed(proceed)?;
            let (local, held_out) = round.trained.take().ok_or(ClientError::Secure(
                folio_secagg::SecAggError::BadRequest("a go-ahead before the shares".into()),
            ))?;
            on_event(ClientEvent::State(ClientState::Uploading { round: number }));
            let spec = *round.client.spec();
            let masked = round.client.mask(&folio_secagg::Input {
                delta: &local.delta,
                weight: spec.weight(local.examples),
                loss: local.metrics.loss,
                accuracy: local.metrics.accuracy,
                held_out,
            })?;
            let bytes_up = send_step(transport, ClientStep::Masked(masked)).await?;
            let report = RoundReport::new(&round.start, &local, round.bytes_down, bytes_up, true);
            on_event(ClientEvent::Trained(report.clone()));
            on_event(ClientEvent::State(ClientState::Securing {
                round: number,
                step: "unmasking",
            }));
            Ok(Some(report))
        }
        ServerStep::Unmask(request) => {
            let reveal = round.client.unmask(request)?;
            send_step(transport, ClientStep::Reveal(reveal)).await?;
            on_event(ClientEvent::State(ClientState::Waiting));
            Ok(None)
        }
    }
}
