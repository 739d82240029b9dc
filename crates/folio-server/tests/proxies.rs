//! folio behind real reverse proxies (nginx and Caddy, Debian's packages, run
//! with the configurations docs/deploy/ ships): they speak HTTPS and pass the
//! WebSocket upgrade; trusted, their X-Forwarded-For names each device, so
//! devices from several networks behind one proxy are capped per network
//! exactly as they are without it, and an address a device writes itself is
//! not believed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use folio_proto::ServerMessage;
use folio_server::proxy::{ClientHeader, TrustedProxies};
use folio_server::{AccessConfig, Limits, Server};
use folio_testkit::certificates::TestCa;
use futures_util::SinkExt;
use rustls::pki_types::pem::PemObject;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A proxy process, stopped when dropped.
struct Proxy {
    process: Child,
    port: u16,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn shipped(name: &str) -> String {
    let path = folio_testkit::repo_root().join("docs/deploy").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Replaces `from` in `text`, which must hold it.
fn replaced(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the shipped config lost {from:?}");
    text.replace(from, to)
}

/// Test files: the public name and its certificate.
struct Site {
    dir: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn site(dir: &Path) -> Site {
    let ca = TestCa::new(dir);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    ca.issue(&["localhost"], "localhost", &cert, &key);
    Site {
        dir: dir.to_owned(),
        ca: ca.cert,
        cert,
        key,
    }
}

/// nginx with docs/deploy/nginx.conf, in front of `upstream`.
fn nginx(site: &Site, upstream: std::net::SocketAddr) -> Proxy {
    let port = free_port();
    let conf = shipped("nginx.conf");
    let conf = replaced(
        &conf,
        "listen 443 ssl;",
        &format!("listen 127.0.0.1:{port} ssl;"),
    );
    let conf = replaced(
        &conf,
        "server_name folio.example.org;",
        "server_name localhost;",
    );
    let conf = replaced(
        &conf,
        "/etc/letsencrypt/live/folio.example.org/fullchain.pem",
        &site.cert.display().to_string(),
    );
    let conf = replaced(
        &conf,
        "/etc/letsencrypt/live/folio.example.org/privkey.pem",
        &site.key.display().to_string(),
    );
    let conf = replaced(
        &conf,
        "http://127.0.0.1:8080",
        &format!("http://{upstream}"),
    );
    let dir = site.dir.display();
    // The shipped file is a site (inside `http`); the rest is the test's own.
    let main = format!(
        "daemon off;\nmaster_process off;\nerror_log stderr warn;\npid {dir}/nginx.pid;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n access_log off;\n client_body_temp_path {dir}/body;\n proxy_temp_path {dir}/proxy;\n\
         fastcgi_temp_path {dir}/fastcgi;\n uwsgi_temp_path {dir}/uwsgi;\n scgi_temp_path {dir}/scgi;\n\
         {conf}\n}}\n"
    );
    let path = site.dir.join("nginx-main.conf");
    std::fs::write(&path, main).unwrap();
    let process = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg("stderr")
        .stdout(Stdio::null())
        .spawn()
        .expect("nginx is installed by scripts/test.sh (Debian package nginx)");
    Proxy { process, port }
}

/// Caddy with docs/deploy/Caddyfile, in front of `upstream`.
fn caddy(site: &Site, upstream: std::net::SocketAddr) -> Proxy {
    let port = free_port();
    let conf = shipped("Caddyfile");
    // A test certificate instead of one from an ACME CA, on a loopback port.
    let conf = replaced(
        &conf,
        "folio.example.org {",
        &format!(
            "localhost:{port} {{\n\tbind 127.0.0.1\n\ttls {} {}",
            site.cert.display(),
            site.key.display()
        ),
    );
    let conf = replaced(&conf, "127.0.0.1:8080", &upstream.to_string());
    let conf = format!("{{\n\tadmin off\n\tauto_https disable_redirects\n}}\n{conf}");
    let path = site.dir.join("Caddyfile");
    std::fs::write(&path, conf).unwrap();
    let process = Command::new("caddy")
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&path)
        .env("HOME", &site.dir)
        .env("XDG_DATA_HOME", site.dir.join("data"))
        .env("XDG_CONFIG_HOME", site.dir.join("config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("caddy is installed by scripts/test.sh (Debian package caddy)");
    Proxy { process, port }
}

fn tls_client(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A `wss://` WebSocket through the proxy from loopback address `source`, with
/// an X-Forwarded-For of the device's own making if `claims` is given.
async fn through(
    proxy: &Proxy,
    tls: &Arc<rustls::ClientConfig>,
    source: &str,
    claims: Option<&str>,
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    let stream = socket
        .connect(format!("127.0.0.1:{}", proxy.port).parse().unwrap())
        .await?;
    let mut request = format!("wss://localhost:{}/ws", proxy.port)
        .into_client_request()
        .unwrap();
    if let Some(claim) = claims {
        request
            .headers_mut()
            .insert("X-Forwarded-For", claim.parse().unwrap());
    }
    let connector = tokio_tungstenite::Connector::Rustls(tls.clone());
    let (socket, _) =
        tokio_tungstenite::client_async_tls_with_config(request, stream, None, Some(connector))
            .await?;
    Ok(socket)
}

/// Waits until the proxy answers on its port.
async fn ready(proxy: &mut Proxy) {
    for _ in 0..200 {
        if let Some(status) = proxy.process.try_wait().unwrap() {
            panic!("the proxy exited: {status}");
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the proxy never listened on {}", proxy.port);
}

/// Two WebSockets a network; what gets through from each of `sources`.
async fn admitted(
    proxy: &Proxy,
    tls: &Arc<rustls::ClientConfig>,
    sources: &[(&str, Option<&str>)],
) -> Vec<bool> {
    let mut open = Vec::new();
    let mut admitted = Vec::new();
    for (source, claims) in sources {
        match through(proxy, tls, source, *claims).await {
            Ok(socket) => {
                admitted.push(true);
                open.push(socket);
            }
            Err(err) => {
                assert!(err.to_string().contains("503"), "{err}");
                admitted.push(false);
            }
        }
    }
    // Frames pass both ways through the proxy: the first device joins.
    let first = &mut open[0];
    first.send(binary(&join(None))).await.unwrap();
    assert!(matches!(
        next_message(first).await,
        ServerMessage::Welcome(_)
    ));
    admitted
}

async fn server(trusted: bool) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), folio_server::RoundConfig::tutorial(), 1_000);
    config.limits = Limits {
        max_connections_per_address: 2,
        max_connections_per_network: 2,
        ..Limits::default()
    };
    config.access = AccessConfig {
        trusted_proxies: TrustedProxies {
            proxies: if trusted {
                vec!["127.0.0.1".parse().unwrap()]
            } else {
                Vec::new()
            },
            header: ClientHeader::XForwardedFor,
        },
        ..config.access
    };
    (dir, Server::start(config).await.unwrap())
}

/// Devices of two networks (127.0.1.x, 127.0.2.x): three from the first, one
/// of which claims another address, and two from the second.
const DEVICES: [(&str, Option<&str>); 5] = [
    ("127.0.1.1", None),
    ("127.0.1.2", None),
    ("127.0.1.3", Some("127.0.7.7")),
    ("127.0.2.1", None),
    ("127.0.2.2", None),
];

async fn behind(start: fn(&Site, std::net::SocketAddr) -> Proxy, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let site = site(dir.path());
    let tls = tls_client(&site.ca);
    let (_state, trusting) = server(true).await;
    let mut proxy = start(&site, trusting.addr);
    ready(&mut proxy).await;
    let per_network = admitted(&proxy, &tls, &DEVICES).await;
    drop(proxy);
    trusting.abort();
    // Two a network: the third of the first network is refused, though it
    // claims an address of its own, and the second network has its two.
    assert_eq!(
        per_network,
        [true, true, false, true, true],
        "behind {name}, trusted"
    );

    // Not trusted, the proxy is one address: two devices in all.
    let (_state, wary) = server(false).await;
    let mut proxy = start(&site, wary.addr);
    ready(&mut proxy).await;
    let as_one = admitted(&proxy, &tls, &DEVICES).await;
    wary.abort();
    assert_eq!(
        as_one,
        [true, true, false, false, false],
        "behind {name}, untrusted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_devices_are_capped_by_their_own_networks() {
    behind(nginx, "nginx").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_caddy_devices_are_capped_by_their_own_networks() {
    behind(caddy, "Caddy").await;
}
