//! The TCP side: a listener that caps connections in all, per address and per
//! network (an IPv4 /24, an IPv6 /64: what one host or one household holds),
//! and closes those that send nothing for a while, before any HTTP is parsed.
//! That covers idle sockets, half-sent requests, idle keep-alives and WebSockets
//! that never join. A joined WebSocket turns the idle timer off and keeps its own
//! liveness rules (`ws.rs`): a client may train silently until its deadline.
//!
//! Admission stays fair under a crowd: when the server is full, a newcomer from a
//! network holding fewer connections than the largest one takes the place of
//! that network's newest connection, so a host with many addresses in a few
//! networks can fill what nobody else wants, never shut others out. WebSockets
//! (sessions) have caps of their own, below the TCP caps: the difference is kept
//! for plain HTTP (the page, `/api/status`), which a flood of sessions never
//! takes.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::task::AtomicWaker;

use crate::proxy::TrustedProxies;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// The network an address belongs to: its /24 (IPv4) or /64 (IPv6).
pub fn network(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(v4.to_bits() & !0xff)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => network(IpAddr::V4(v4)),
            None => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

/// The allocation an address belongs to, as addresses are handed out: an IPv6
/// /48 (a site's; its 65,536 /64s cost a host nothing) or an IPv4 /24 (the
/// network itself: IPv4 is scarce). Eviction, and the engine's fairness, go by
/// allocation first, so many prefixes of one allocation get one allocation's share.
pub fn allocation(address: IpAddr) -> IpAddr {
    match network(address) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !(u128::MAX >> 48))),
        v4 => v4,
    }
}

/// How many connections of each kind a scope may hold.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub total: usize,
    pub per_address: usize,
    pub per_network: usize,
}

/// TCP connections kept for plain HTTP beyond the WebSocket caps.
pub const HTTP_ROOM: Caps = Caps {
    total: 64,
    per_address: 8,
    per_network: 16,
};

/// WebSockets kept beyond the caps for sessions coming back: only a connection
/// that proved a session's token before its upgrade gets one, and it may only
/// resume that session, so a crowd cannot use or hold the room.
pub const RESUME_ROOM: Caps = Caps {
    total: 32,
    per_address: 4,
    per_network: 8,
};

/// How a WebSocket was let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within the caps.
    Open,
    /// In the room kept for sessions coming back: it may only resume one.
    ResumeOnly,
}

/// Tells a connection to end (it was evicted for a newcomer).
#[derive(Debug, Default)]
struct Eviction {
    evicted: AtomicBool,
    waker: AtomicWaker,
}

impl Eviction {
    fn evict(&self) {
        self.evicted.store(true, Ordering::Relaxed);
        self.waker.wake();
    }

    fn check(&self, cx: &Context<'_>) -> io::Result<()> {
        self.waker.register(cx.waker());
        if self.evicted.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "evicted: a newcomer from a less represented network took the place",
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Entry {
    id: u64,
    address: IpAddr,
    websocket: bool,
    eviction: Arc<Eviction>,
}

/// Open connections by address and network, oldest first in each network.
#[derive(Debug, Default)]
struct Table {
    /// TCP connections and WebSockets of each address.
    per_address: HashMap<IpAddr, (usize, usize)>,
    per_network: HashMap<IpAddr, Vec<Entry>>,
    tcp: usize,
    websockets: usize,
    next_id: u64,
}

impl Table {
    fn in_network(&self, network: IpAddr, websockets: bool) -> usize {
        self.per_network.get(&network).map_or(0, |entries| {
            entries
                .iter()
                .filter(|e| !websockets || e.websocket)
                .count()
        })
    }

    /// Gives connection `id`'s places back.
    fn remove(&mut self, network: IpAddr, id: u64) {
        let Some(entries) = self.per_network.get_mut(&network) else {
            return;
        };
        let Some(at) = entries.iter().position(|e| e.id == id) else {
            return;
        };
        let entry = entries.remove(at);
        if entries.is_empty() {
            self.per_network.remove(&network);
        }
        if let Some((tcp, ws)) = self.per_address.get_mut(&entry.address) {
            *tcp -= 1;
            *ws -= usize::from(entry.websocket);
            if *tcp == 0 {
                self.per_address.remove(&entry.address);
            }
        }
        self.tcp -= 1;
        self.websockets -= usize::from(entry.websocket);
    }

    /// Counts TCP connection `id` as `to`'s instead of `from`'s.
    fn reassign(&mut self, from: IpAddr, to: IpAddr, id: u64) {
        let Some(entries) = self.per_network.get_mut(&network(from)) else {
            return;
        };
        let Some(at) = entries.iter().position(|e| e.id == id) else {
            return;
        };
        let mut entry = entries.remove(at);
        if entries.is_empty() {
            self.per_network.remove(&network(from));
        }
        if let Some((tcp, _)) = self.per_address.get_mut(&from) {
            *tcp -= 1;
            if *tcp == 0 {
                self.per_address.remove(&from);
            }
        }
        self.per_address.entry(to).or_default().0 += 1;
        entry.address = to;
        self.per_network.entry(network(to)).or_default().push(entry);
    }

    /// Ends the newest connection (a WebSocket, if `websockets`) of the largest
    /// network of the allocation holding the most, if that allocation holds more
    /// than `newcomer`'s would with the newcomer in; its places are free at once.
    /// Returns whether one was.
    fn evict_for(&mut self, newcomer: IpAddr, websockets: bool) -> bool {
        let mut per_allocation: HashMap<IpAddr, usize> = HashMap::new();
        for &network in self.per_network.keys() {
            *per_allocation.entry(allocation(network)).or_default() +=
                self.in_network(network, websockets);
        }
        let theirs = per_allocation
            .get(&allocation(newcomer))
            .copied()
            .unwrap_or(0)
            + 1;
        let Some((held, crowded)) = per_allocation.into_iter().map(|(a, n)| (n, a)).max() else {
            return false;
        };
        if held <= theirs {
            return false;
        }
        let largest = self
            .per_network
            .keys()
            .filter(|&&n| allocation(n) == crowded)
            .map(|&n| (self.in_network(n, websockets), n))
            .max();
        let Some((_, network)) = largest else {
            return false;
        };
        let victim = self.per_network[&network]
            .iter()
            .rev()
            .find(|e| !websockets || e.websocket)
            .map(|e| (e.id, e.eviction.clone()));
        let Some((id, eviction)) = victim else {
            return false;
        };
        eviction.evict();
        self.remove(network, id);
        true
    }
}

/// Connections open now, in all, per address and per network.
#[derive(Debug)]
pub struct ConnectionCount {
    table: Mutex<Table>,
    /// WebSocket caps; TCP caps are these plus [`HTTP_ROOM`].
    caps: Caps,
    total: AtomicU64,
    /// Connections refused at accept because a cap was reached.
    pub refused: AtomicU64,
    /// Connections ended to make room for a newcomer from another network.
    pub evicted: AtomicU64,
}

impl ConnectionCount {
    pub fn new(caps: Caps) -> Self {
        Self {
            table: Mutex::new(Table::default()),
            caps,
            total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// A place for a TCP connection from `address`, or `None` at a cap. A
    /// trusted proxy's connections carry many devices: only the total caps
    /// them here, and each WebSocket is counted as its device's at the upgrade.
    fn admit(self: &Arc<Self>, address: IpAddr, proxy: bool) -> Option<Permit> {
        let network = network(address);
        let mut table = self.table();
        let Caps {
            total,
            per_address,
            per_network,
        } = self.caps;
        let here = table.per_address.get(&address).map_or(0, |c| c.0);
        let full = if proxy {
            table.tcp >= total + HTTP_ROOM.total
        } else {
            here >= per_address + HTTP_ROOM.per_address
                || table.in_network(network, false) >= per_network + HTTP_ROOM.per_network
                || (table.tcp >= total + HTTP_ROOM.total && !self.evict(&mut table, network, false))
        };
        if full {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let id = table.next_id;
        table.next_id += 1;
        table.tcp += 1;
        table.per_address.entry(address).or_default().0 += 1;
        let eviction = Arc::new(Eviction::default());
        table.per_network.entry(network).or_default().push(Entry {
            id,
            address,
            websocket: false,
            eviction: eviction.clone(),
        });
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Permit {
            count: self.clone(),
            address: Mutex::new(address),
            id,
            eviction,
        })
    }

    fn evict(&self, table: &mut Table, network: IpAddr, websockets: bool) -> bool {
        let evicted = table.evict_for(network, websockets);
        if evicted {
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        evicted
    }

    /// Makes connection `permit` a WebSocket of the device at `client` (the TCP
    /// peer, or behind a trusted proxy the address it vouches for), if the
    /// WebSocket caps allow (a newcomer's network may take the place of the
    /// largest network's newest), or a session `resuming` finds room in
    /// [`RESUME_ROOM`]; `None`: refused.
    pub fn upgrade(&self, permit: &PermitRef, client: IpAddr, resuming: bool) -> Option<Admission> {
        let permit = &permit.0;
        let mut table = self.table();
        if permit.eviction.evicted.load(Ordering::Relaxed) {
            return None;
        }
        // From here on the connection counts as its device's, in its network.
        let mut address = permit.address.lock().unwrap_or_else(|p| p.into_inner());
        if *address != client {
            table.reassign(*address, client, permit.id);
            *address = client;
        }
        let network = network(client);
        let Caps {
            total,
            per_address,
            per_network,
        } = self.caps;
        let here = table.per_address.get(&client).map_or(0, |c| c.1);
        let in_network = table.in_network(network, true);
        let admission = if here < per_address
            && in_network < per_network
            && (table.websockets < total || self.evict(&mut table, network, true))
        {
            Admission::Open
        } else if resuming
            && here < per_address + RESUME_ROOM.per_address
            && in_network < per_network + RESUME_ROOM.per_network
            && table.websockets < total + RESUME_ROOM.total
        {
            Admission::ResumeOnly
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let entry = table
            .per_network
            .get_mut(&network)
            .and_then(|entries| entries.iter_mut().find(|e| e.id == permit.id));
        if let Some(entry) = entry {
            entry.websocket = true;
            table.websockets += 1;
            table.per_address.entry(client).or_default().1 += 1;
        }
        Some(admission)
    }
}

/// Holds one connection's place in the count; gives it back on drop.
#[derive(Debug)]
struct Permit {
    count: Arc<ConnectionCount>,
    /// The device it counts for: the TCP peer, or the one a proxy vouched for.
    address: Mutex<IpAddr>,
    id: u64,
    eviction: Arc<Eviction>,
}

/// A connection's place, as its handlers see it (to make it a WebSocket).
#[derive(Debug, Clone)]
pub struct PermitRef(Arc<Permit>);

impl PermitRef {
    /// The address the connection counts for.
    #[cfg(test)]
    fn address(&self) -> IpAddr {
        *self.0.address.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // An evicted connection's places were given back when it was evicted.
        let address = *self.address.lock().unwrap_or_else(|p| p.into_inner());
        self.count.table().remove(network(address), self.id);
        self.count.total.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct CappedListener {
    inner: TcpListener,
    count: Arc<ConnectionCount>,
    idle: Duration,
    proxies: Arc<TrustedProxies>,
}

impl CappedListener {
    pub fn new(
        inner: TcpListener,
        count: Arc<ConnectionCount>,
        idle: Duration,
        proxies: TrustedProxies,
    ) -> Self {
        Self {
            inner,
            count,
            idle,
            proxies: Arc::new(proxies),
        }
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
            let proxy = self.proxies.trusts(address.ip());
            let Some(permit) = self.count.admit(address.ip(), proxy) else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            return (
                GuardedStream {
                    inner: stream,
                    permit: Arc::new(permit),
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
    permit: Arc<Permit>,
    idle: IdleTimer,
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.permit.eviction.check(cx)?;
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
        self.permit.eviction.check(cx)?;
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
    /// The device's address: the TCP peer's, or behind a trusted proxy the one
    /// it vouches for in this request.
    pub address: SocketAddr,
    pub idle: Arc<IdleControl>,
    pub permit: PermitRef,
}

/// Serves HTTP (and WebSocket upgrades) on `listener`, over TLS where `tls` is
/// given, until `closing` is set. The TLS handshake and then every request's
/// head must each arrive within `header_timeout`: a client trickling bytes holds
/// its connection for that long at most.
pub async fn serve(
    mut listener: CappedListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: axum::Router,
    header_timeout: Duration,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (io, address) = tokio::select! {
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            _ = closing.wait_for(|&closing| closing) => return,
        };
        let peer = PeerInfo {
            address,
            idle: io.idle.control.clone(),
            permit: PermitRef(io.permit.clone()),
        };
        let router = router.clone();
        let tls = tls.clone();
        let proxies = listener.proxies.clone();
        tokio::spawn(async move {
            let ended = match tls {
                None => serve_connection(io, peer, proxies, router, header_timeout).await,
                Some(tls) => match tokio::time::timeout(header_timeout, tls.accept(io)).await {
                    Ok(Ok(io)) => serve_connection(io, peer, proxies, router, header_timeout).await,
                    Ok(Err(err)) => Err(format!("TLS handshake failed: {err}").into()),
                    Err(_) => Err("no TLS handshake in time".into()),
                },
            };
            if let Err(err) = ended {
                tracing::debug!(%address, "connection ended: {err}");
            }
        });
    }
}

/// Serves one connection's requests, each with its device's [`PeerInfo`] for
/// the handlers (a proxy may carry several devices' requests on one connection).
async fn serve_connection<I>(
    io: I,
    peer: PeerInfo,
    proxies: Arc<TrustedProxies>,
    router: axum::Router,
    header_timeout: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    let service = hyper::service::service_fn(
        move |mut request: axum::http::Request<hyper::body::Incoming>| {
            let client = proxies.client(peer.address.ip(), request.headers());
            let device = PeerInfo {
                address: SocketAddr::new(client, peer.address.port()),
                ..peer.clone()
            };
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(device));
            router.clone().oneshot(request.map(axum::body::Body::new))
        },
    );
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_network_is_an_ipv4_slash_24_or_an_ipv6_slash_64() {
        assert_eq!(network(ip("203.0.113.77")), ip("203.0.113.0"));
        assert_eq!(network(ip("127.0.1.201")), network(ip("127.0.1.2")));
        assert_ne!(network(ip("127.0.1.2")), network(ip("127.0.0.1")));
        assert_eq!(
            network(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(
            network(ip("2001:db8:1:2::1")),
            network(ip("2001:db8:1:3::1"))
        );
        // An IPv4 peer on a dual-stack socket is its IPv4 network.
        assert_eq!(network(ip("::ffff:203.0.113.77")), ip("203.0.113.0"));
    }

    #[test]
    fn many_ipv6_prefixes_of_one_allocation_give_way_as_one() {
        assert_eq!(allocation(ip("2001:db8:7:ab::1")), ip("2001:db8:7::"));
        assert_eq!(allocation(ip("203.0.113.9")), ip("203.0.113.0"));
        let count = Arc::new(ConnectionCount::new(Caps {
            total: 3,
            per_address: 10,
            per_network: 10,
        }));
        // One host, three /64s of its /48: each /64 holds one place.
        let crowd: Vec<PermitRef> = (1..=3)
            .map(|i| {
                PermitRef(Arc::new(
                    count
                        .admit(ip(&format!("2001:db8:7:{i}::1")), false)
                        .unwrap(),
                ))
            })
            .collect();
        for permit in &crowd {
            assert_eq!(
                count.upgrade(permit, permit.address(), false),
                Some(Admission::Open)
            );
        }
        // A device of another allocation takes the newest /64's place: by
        // networks alone (one each) it would have been refused.
        let newcomer = PermitRef(Arc::new(count.admit(ip("2001:db8:9::5"), false).unwrap()));
        assert_eq!(
            count.upgrade(&newcomer, newcomer.address(), false),
            Some(Admission::Open)
        );
        assert!(crowd[2].0.eviction.evicted.load(Ordering::Relaxed));
        // Another /64 of the crowd's /48 takes nobody's place.
        let more = PermitRef(Arc::new(count.admit(ip("2001:db8:7:4::1"), false).unwrap()));
        assert_eq!(count.upgrade(&more, more.address(), false), None);
    }

    #[test]
    fn eviction_takes_the_newest_of_the_largest_network_only_when_it_is_fairer() {
        let count = Arc::new(ConnectionCount::new(Caps {
            total: 3,
            per_address: 10,
            per_network: 10,
        }));
        // Three WebSockets from one network fill the server's three places.
        let crowd: Vec<PermitRef> = (1..=3)
            .map(|i| {
                PermitRef(Arc::new(
                    count.admit(ip(&format!("10.0.0.{i}")), false).unwrap(),
                ))
            })
            .collect();
        for permit in &crowd {
            assert_eq!(
                count.upgrade(permit, permit.address(), false),
                Some(Admission::Open)
            );
        }
        let newcomer = PermitRef(Arc::new(count.admit(ip("10.0.9.1"), false).unwrap()));
        assert_eq!(
            count.upgrade(&newcomer, newcomer.address(), false),
            Some(Admission::Open),
            "3 > 1: the crowd gives a place"
        );
        assert!(
            crowd[2].0.eviction.evicted.load(Ordering::Relaxed),
            "its newest"
        );
        assert!(!crowd[0].0.eviction.evicted.load(Ordering::Relaxed));
        // 2 against 2 with the next newcomer in: nobody gives way.
        let second = PermitRef(Arc::new(count.admit(ip("10.0.9.2"), false).unwrap()));
        assert_eq!(count.upgrade(&second, second.address(), false), None);
        assert_eq!(count.evicted.load(Ordering::Relaxed), 1);
        // Coming back to resume, it gets the room kept for that.
        assert_eq!(
            count.upgrade(&second, second.address(), true),
            Some(Admission::ResumeOnly)
        );
        // The evicted connection gives nothing back twice when it ends.
        drop(crowd);
        drop(second);
        assert_eq!(count.table().websockets, 1);
        assert_eq!(count.open(), 1);
    }
}
