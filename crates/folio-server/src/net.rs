//! The TCP side: a listener that caps connections (in all and per address) and
//! closes those that send nothing for a while, before any HTTP is parsed. That
//! covers idle sockets, half-sent requests, idle keep-alives and WebSockets that
//! never join. A joined WebSocket turns the idle timer off and keeps its own
//! liveness rules (`ws.rs`): a client may train silently until its deadline.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// Connections open now, in all and per address.
#[derive(Debug, Default)]
pub struct ConnectionCount {
    per_address: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicU64,
    /// Connections refused at accept because a cap was reached.
    pub refused: AtomicU64,
}

impl ConnectionCount {
    pub fn open(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// Holds one connection's place in the count; gives it back on drop.
#[derive(Debug)]
struct Permit {
    count: Arc<ConnectionCount>,
    address: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut map = self
            .count
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.address);
            }
        }
        self.count.total.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct CappedListener {
    inner: TcpListener,
    count: Arc<ConnectionCount>,
    max_total: usize,
    max_per_address: usize,
    idle: Duration,
}

impl CappedListener {
    pub fn new(
        inner: TcpListener,
        count: Arc<ConnectionCount>,
        max_total: usize,
        max_per_address: usize,
        idle: Duration,
    ) -> Self {
        Self {
            inner,
            count,
            max_total,
            max_per_address,
            idle,
        }
    }

    fn admit(&self, address: IpAddr) -> Option<Permit> {
        let mut map = self
            .count
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let here = map.entry(address).or_default();
        if *here >= self.max_per_address || self.count.open() as usize >= self.max_total {
            if *here == 0 {
                map.remove(&address);
            }
            self.count.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *here += 1;
        self.count.total.fetch_add(1, Ordering::Relaxed);
        Some(Permit {
            count: self.count.clone(),
            address,
        })
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = GuardedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, address) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over a cap: dropping the stream closes it at once.
            let Some(permit) = self.admit(address.ip()) else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            return (
                GuardedStream {
                    inner: stream,
                    _permit: permit,
                    idle: IdleTimer::new(self.idle),
                },
                address,
            );
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The idle rule of one connection, shared with its request handlers.
#[derive(Debug)]
pub struct IdleControl {
    enabled: AtomicBool,
}

impl IdleControl {
    /// The connection keeps its own liveness rules from now on.
    pub fn disable(&self) {
        self.enabled.store(false, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct IdleTimer {
    control: Arc<IdleControl>,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleTimer {
    fn new(timeout: Duration) -> Self {
        Self {
            control: Arc::new(IdleControl {
                enabled: AtomicBool::new(true),
            }),
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

/// A TCP stream that holds its place in the connection count and fails a read
/// that waits longer than the idle timeout with nothing moving either way (a long
/// download is progress too).
#[derive(Debug)]
pub struct GuardedStream {
    inner: TcpStream,
    _permit: Permit,
    idle: IdleTimer,
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.progressed();
                Poll::Ready(result)
            }
            Poll::Pending => {
                if !this.idle.control.enabled.load(Ordering::Relaxed) {
                    return Poll::Pending;
                }
                ready!(this.idle.sleep.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer sent nothing for too long",
                )))
            }
        }
    }
}

impl GuardedStream {
    fn progressed(&mut self) {
        let timeout = self.idle.timeout;
        self.idle.sleep.as_mut().reset(Instant::now() + timeout);
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
        self.progressed();
        Poll::Ready(written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs));
        self.progressed();
        Poll::Ready(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What a handler learns about its connection (axum's `ConnectInfo`).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub address: SocketAddr,
    pub idle: Arc<IdleControl>,
}

/// Serves HTTP (and WebSocket upgrades) on `listener` until `closing` is set.
/// Every request's head must arrive within `header_timeout` of its first byte: a
/// client trickling bytes holds its connection for that long at most.
pub async fn serve(
    mut listener: CappedListener,
    router: axum::Router,
    header_timeout: Duration,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    loop {
        let (io, address) = tokio::select! {
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            _ = closing.wait_for(|&closing| closing) => return,
        };
        let peer = PeerInfo {
            address,
            idle: io.idle.control.clone(),
        };
        let router = router.clone();
        let service = hyper::service::service_fn(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer.clone()));
                router.clone().oneshot(request.map(axum::body::Body::new))
            },
        );
        tokio::spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            if let Err(err) = connection.await {
                tracing::debug!(%address, "connection ended: {err}");
            }
        });
    }
}
