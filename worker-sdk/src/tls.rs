//! TLS for the servers of this crate (cargo feature `tls`): rustls through
//! `tokio-rustls`, with the `ring` provider and no OpenSSL.
//!
//! [`load`] reads a PEM certificate chain and key into a rustls server
//! configuration that offers ALPN `h2` and `http/1.1`; [`accept`] runs one
//! connection's handshake with a deadline. Certificates are reloaded the
//! baton way: each generation reads the files when it starts, so renewing a
//! certificate is writing the new files and `baton reload`.
//!
//! This module never binds, never accepts, and never reads a file but the
//! two it is given.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::Error;

/// The `rustls` this crate links, for building a configuration by hand.
pub use tokio_rustls::rustls;

/// A TLS stream on the server side, as [`accept`] returns it.
pub use tokio_rustls::server::TlsStream;

/// How long a client may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The ALPN protocols [`load`] and [`server_config`] offer, most preferred
/// first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Reads a PEM certificate chain (leaf first) and a PEM private key (PKCS#8,
/// PKCS#1 or SEC1) into a server configuration offering [`ALPN`].
///
/// ```no_run
/// let tls = baton_worker::tls::load("cert.pem", "key.pem")?;
/// # Ok::<(), baton_worker::Error>(())
/// ```
pub fn load(
    cert: impl AsRef<Path>,
    key: impl AsRef<Path>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let (cert, key) = (cert.as_ref(), key.as_ref());
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::Tls {
            what: format!("reading the TLS certificate chain {}", cert.display()),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(Error::Tls {
            what: format!("reading the TLS certificate chain {}", cert.display()),
            reason: "no certificate in it".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| Error::Tls {
        what: format!("reading the TLS private key {}", key.display()),
        reason: e.to_string(),
    })?;
    server_config(chain, key)
}

/// A server configuration for `chain` and `key`, offering [`ALPN`], with
/// the `ring` crypto provider and its default protocol versions.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let error = |e: rustls::Error| Error::Tls {
        what: "building the TLS configuration".into(),
        reason: e.to_string(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(error)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(error)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Runs the server side of a TLS handshake on `io`, at most
/// [`HANDSHAKE_TIMEOUT`]. Call it on the connection's own task (the
/// handler of [`serve_connections`](crate::serve_connections)), and let it
/// finish even when the drain has begun: the client is already talking to
/// this generation.
///
/// ```no_run
/// # async fn doc(stream: tokio::net::TcpStream, drain: baton_worker::Drain) -> Result<(), baton_worker::Error> {
/// let tls = baton_worker::tls::load("cert.pem", "key.pem")?;
/// match baton_worker::tls::accept(&tls, stream).await {
///     Ok(stream) => { /* serve it; end at a boundary once `drain` says */ }
///     Err(e) => eprintln!("handshake: {e}"),
/// }
/// # Ok(()) }
/// ```
pub async fn accept<I>(config: &Arc<rustls::ServerConfig>, io: I) -> std::io::Result<TlsStream<I>>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(done) => done,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the client did not complete its handshake within {HANDSHAKE_TIMEOUT:?}"),
        )),
    }
}
