//! The SDK's HTTP server speaks HTTP/1.1 and HTTP/2 on one listener, and
//! HTTPS with ALPN `h2` and `http/1.1`, and each drains exactly: `hello`
//! (and `hello --tls`) under the real `baton`, reloaded thirty times and
//! more under load in both protocols at once, every request counted, no
//! failure allowed. Certificates are read by each generation, so a reload
//! serves a renewed one.

use std::path::{Path, PathBuf};

use baton_tests::harness::{bin, Baton, Load};
use baton_tests::hyper_load::{tls_client, HyperLoad, HyperLoadConfig, Protocol};
use baton_tests::load::LoadReport;

const RELOADS: u64 = 30;

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM
/// files in `dir`; returns their paths and the certificate's DER.
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("generating a certificate");
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("writing the certificate");
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).expect("writing the key");
    (cert_path, key_path, cert.cert.der().to_vec())
}

fn hyper_load(baton: &Baton, protocol: Protocol) -> HyperLoad {
    let addr = baton.address("http").parse().expect("a TCP address");
    let mut config = HyperLoadConfig::new(addr, protocol);
    config.concurrency = 6;
    config.connections = 2;
    // Every 50th request takes 700ms: it spans a reload or two.
    config.slow_fraction = 0.02;
    config.slow_ms = 700;
    HyperLoad::start(config)
}

/// Checks a finished load: no failure, and many generations served it.
fn check(name: &str, report: &LoadReport) {
    eprintln!("{name}: {report}");
    report.assert_no_failures();
    let served = report.generations.len() as u64;
    assert!(
        served > RELOADS / 2,
        "{name}: only {served} generations served: {report}"
    );
}

#[test]
fn hello_serves_http1_and_h2c_on_one_listener_through_thirty_reloads() {
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .worker([bin("hello")])
        .start();
    let http1 = Load::http(&baton, "http", |c| {
        c.concurrency = 6;
        c.keep_alive_fraction = 0.5;
        c.slow_fraction = 0.02;
        c.slow_ms = 700;
    });
    let h2c = hyper_load(&baton, Protocol::H2c);
    http1.wait_ok(20);
    h2c.wait_ok(20);
    for i in 1..=RELOADS {
        assert_eq!(baton.reload_ok(), 1 + i);
        http1.wait_ok(5);
        h2c.wait_ok(5);
    }
    let (http1, h2c) = (http1.finish(), h2c.finish());
    check("http/1.1", &http1);
    check("h2c", &h2c);
    baton.wait_settled();
}

#[test]
fn https_with_alpn_h2_and_http1_through_thirty_reloads_and_a_renewed_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, der) = self_signed(dir.path(), "server");
    let baton = Baton::builder()
        .args(["--listen", "http=tcp://127.0.0.1:0"])
        .worker([
            bin("hello").into_os_string(),
            "--tls".into(),
            cert.clone().into_os_string(),
            key.clone().into_os_string(),
        ])
        .start();
    let tls = |http2: bool| Protocol::Tls {
        config: tls_client(&der, http2),
        server_name: "localhost".into(),
        http2,
    };
    let h2 = hyper_load(&baton, tls(true));
    let http1 = hyper_load(&baton, tls(false));
    h2.wait_ok(20);
    http1.wait_ok(20);
    for i in 1..=RELOADS {
        assert_eq!(baton.reload_ok(), 1 + i);
        h2.wait_ok(5);
        http1.wait_ok(5);
    }
    let (h2, http1) = (h2.finish(), http1.finish());
    check("https h2", &h2);
    check("https http/1.1", &http1);

    // Renewal the baton way: new files, then a reload. The new generation
    // serves the new certificate; a client that trusts only it connects.
    let (new_cert, new_key, new_der) = self_signed(dir.path(), "renewed");
    std::fs::rename(new_cert, &cert).expect("replacing the certificate");
    std::fs::rename(new_key, &key).expect("replacing the key");
    assert_eq!(baton.reload_ok(), 2 + RELOADS);
    baton.wait_settled();
    let renewed = Protocol::Tls {
        config: tls_client(&new_der, true),
        server_name: "localhost".into(),
        http2: true,
    };
    let after = hyper_load(&baton, renewed);
    after.wait_ok(10);
    let after = after.finish();
    after.assert_no_failures();
    assert_eq!(
        after.generations.keys().copied().collect::<Vec<_>>(),
        [2 + RELOADS],
        "{after}"
    );
}
