//! Federations in one process, on the same round engine as `folio serve`:
//!
//! - [`loopback`]: the real aggregator and N native clients over loopback
//!   WebSocket (`folio simulate`);
//! - [`host`]: the engine's host for in-process clients;
//! - [`devices`]: a population on devices of every speed, on a simulated
//!   clock (synchronous against asynchronous rounds);
//! - [`population`]: every Shakespeare client, trained in process, at the
//!   papers' scale (`folio simulate --population`);
//! - [`influence`]: what one attacker among honest clients does to the global
//!   model under each aggregator (`folio bench influence`).

pub mod devices;
pub mod host;
pub mod influence;
pub mod loopback;
pub mod population;
