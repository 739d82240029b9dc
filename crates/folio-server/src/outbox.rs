//! One connection's queue of frames to send, bounded: a client that does not
//! read is dropped rather than buffered without end.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

#[derive(Debug, Clone)]
pub struct Outbox {
    frames: mpsc::Sender<Bytes>,
    kill: Arc<Notify>,
}

impl Outbox {
    pub fn new(frames: mpsc::Sender<Bytes>, kill: Arc<Notify>) -> Self {
        Self { frames, kill }
    }

    /// Ends the connection.
    pub fn close(&self) {
        self.kill.notify_one();
    }

    /// Queues a frame; a client whose queue is full is not reading: drop it.
    pub fn send(&self, frame: Bytes) {
        use mpsc::error::TrySendError;
        match self.frames.try_send(frame) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => self.kill.notify_one(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_full_outbox_drops_its_connection() {
        let (tx, _rx) = mpsc::channel(2);
        let kill = Arc::new(Notify::new());
        let outbox = Outbox::new(tx, kill.clone());
        outbox.send(Bytes::from_static(b"1"));
        outbox.send(Bytes::from_static(b"2"));
        let killed = kill.notified();
        outbox.send(Bytes::from_static(b"3"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), killed)
                .await
                .expect("the full queue kills the connection")
        });
    }
}
