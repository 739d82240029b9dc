//! The browser's WebSocket as a [`Transport`] for the shared client loop.

use folio_client::{ClientError, HeldModel, Transport};
use futures_channel::{mpsc, oneshot};
use futures_util::StreamExt;
use js_sys::{ArrayBuffer, Uint8Array};
use js_sys::{Function, Promise};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};

pub struct BrowserTransport {
    socket: WebSocket,
    frames: mpsc::UnboundedReceiver<Vec<u8>>,
    /// How the connection ended, once it has.
    closed: std::rc::Rc<std::cell::RefCell<Option<String>>>,
    /// Keeps a round's model: `keep({round, encoding, weights})` → a promise.
    keep: Option<Function>,
    // Kept alive as long as the socket calls them.
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_close: Closure<dyn FnMut(CloseEvent)>,
}

impl BrowserTransport {
    /// Opens `url` (`ws://host/ws`), as the holder of session `resume` (its
    /// token, offered as [`folio_client::resume_protocol`]), and waits until the
    /// socket is open. `keep` stores each round's model (and resolves when it is
    /// stored).
    pub async fn connect(
        url: &str,
        resume: Option<&str>,
        keep: Option<Function>,
    ) -> Result<Self, ClientError> {
        let socket = match resume {
            Some(token) => WebSocket::new_with_str(url, &folio_client::resume_protocol(token)),
            None => WebSocket::new(url),
        }
        .map_err(|e| ClientError::Connection(format!("{url}: {e:?}")))?;
        socket.set_binary_type(BinaryType::Arraybuffer);
        let (frames_tx, frames) = mpsc::unbounded();
        let on_message = {
            let frames_tx = frames_tx.clone();
            Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
                if let Ok(buffer) = event.data().dyn_into::<ArrayBuffer>() {
                    let _ = frames_tx.unbounded_send(Uint8Array::new(&buffer).to_vec());
                }
            })
        };
        let (opened_tx, opened) = oneshot::channel::<bool>();
        let opened_tx = std::cell::RefCell::new(Some(opened_tx));
        let closed = std::rc::Rc::new(std::cell::RefCell::new(None));
        let on_close = Closure::<dyn FnMut(CloseEvent)>::new({
            let closed = closed.clone();
            move |event: CloseEvent| {
                *closed.borrow_mut() = Some(format!(
                    "the aggregator's connection closed (code {}{})",
                    event.code(),
                    if event.reason().is_empty() {
                        String::new()
                    } else {
                        format!(": {}", event.reason())
                    }
                ));
                // Ends `recv`; also answers `connect` if the socket never opened.
                frames_tx.close_channel();
                if let Some(tx) = opened_tx.borrow_mut().take() {
                    let _ = tx.send(false);
                }
            }
        });
        socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        let (open_tx, open_rx) = oneshot::channel::<()>();
        let open_tx = std::cell::RefCell::new(Some(open_tx));
        let on_open = Closure::<dyn FnMut()>::new(move || {
            if let Some(tx) = open_tx.borrow_mut().take() {
                let _ = tx.send(());
            }
        });
        socket.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        let opened_ok = futures_util::future::select(open_rx, opened).await;
        socket.set_onopen(None);
        drop(on_open);
        match opened_ok {
            futures_util::future::Either::Left((Ok(()), _)) => Ok(Self {
                socket,
                frames,
                closed,
                keep,
                _on_message: on_message,
                _on_close: on_close,
            }),
            _ => Err(ClientError::Connection(format!(
                "{url}: cannot connect; is `folio serve` running?"
            ))),
        }
    }
}

impl Transport for BrowserTransport {
    async fn send(&mut self, frame: Vec<u8>) -> Result<(), ClientError> {
        // A copy the page owns: the threaded build's memory is shared, and
        // browsers refuse to send a view of shared memory.
        self.socket
            .send_with_array_buffer_view(&Uint8Array::from(frame.as_slice()))
            .map_err(|e| ClientError::Connection(format!("{e:?}")))
    }

    async fn keep_model(&mut self, round: u64, model: &HeldModel) {
        let Some(keep) = &self.keep else { return };
        let record = crate::object(&[
            ("round", (round as f64).into()),
            ("encoding", model.encoding.tag().into()),
            (
                "weights",
                js_sys::Uint8Array::from(model.weights.as_slice()).into(),
            ),
        ]);
        // A tab that cannot store it trains all the same.
        if let Ok(promise) = keep.call1(&JsValue::NULL, &record)
            && let Ok(promise) = promise.dyn_into::<Promise>()
        {
            let _ = JsFuture::from(promise).await;
        }
    }

    /// A tab never ends its part on its own: any close is the aggregator going
    /// away (a restart, a crash, the network), to reconnect from.
    async fn recv(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        match self.frames.next().await {
            Some(frame) => Ok(Some(frame)),
            None => Err(ClientError::Connection(
                self.closed
                    .borrow()
                    .clone()
                    .unwrap_or_else(|| "the aggregator's connection closed".into()),
            )),
        }
    }
}

impl Drop for BrowserTransport {
    fn drop(&mut self) {
        // The handlers die with this value: the socket must not call them after.
        self.socket.set_onmessage(None);
        self.socket.set_onclose(None);
        let _ = self.socket.close();
    }
}
