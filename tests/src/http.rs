//! One-off HTTP/1.1 `GET`s for the integration tests and the benchmark: the
//! few requests a test sends by hand to look at one answer, beside the load
//! client (`load`) that counts thousands.
//!
//! Two shapes. [`get`], [`get_unix`] and their `_json` forms open a fresh
//! TCP or Unix stream connection, send `GET` with `Connection: close`, and
//! read the answer to its end within a deadline; they give the body of a
//! `200` and take any other status as an error that carries the whole
//! answer. [`get_keep_alive`] ([`send_get`], then [`read_response`]) works
//! on a connection the test keeps (keep-alive, a request left in flight
//! across reloads), one response at a time, framed by `Content-Length`.
//!
//! Errors are strings that say which request failed and how; the tests turn
//! them into panics. This module never retries and never sleeps.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The deadline the tests give a request unless they need another.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// `GET path` on a fresh TCP connection to `addr` (`127.0.0.1:8080`,
/// `[::1]:8080`): the body of a `200`, received whole within `timeout`.
pub fn get(addr: &str, path: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let what = || format!("GET {path} on {addr}");
    let target = addr
        .to_socket_addrs()
        .map_err(|e| format!("{}: resolving: {e}", what()))?
        .next()
        .ok_or_else(|| format!("{}: the address resolves to nothing", what()))?;
    let mut stream = TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| format!("{}: connecting: {e}", what()))?;
    get_on(&mut stream, path, deadline).map_err(|e| format!("{}: {e}", what()))
}

/// `GET path` on a fresh connection to the Unix stream socket `socket`:
/// the body of a `200`, received whole within `timeout`.
pub fn get_unix(socket: &Path, path: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let what = || format!("GET {path} on {}", socket.display());
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("{}: connecting: {e}", what()))?;
    get_on(&mut stream, path, deadline).map_err(|e| format!("{}: {e}", what()))
}

/// [`get`], with the body parsed as JSON.
pub fn get_json(addr: &str, path: &str, timeout: Duration) -> Result<Value, String> {
    json(&get(addr, path, timeout)?).map_err(|e| format!("GET {path} on {addr}: {e}"))
}

/// [`get_unix`], with the body parsed as JSON.
pub fn get_unix_json(socket: &Path, path: &str, timeout: Duration) -> Result<Value, String> {
    json(&get_unix(socket, path, timeout)?)
        .map_err(|e| format!("GET {path} on {}: {e}", socket.display()))
}

/// A stream connection whose reads can be bounded in time.
trait Connection: Read + Write {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl Connection for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

impl Connection for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

/// Sends `GET path` with `Connection: close` on `stream` and reads the
/// answer to its end, each read bounded by what is left until `deadline`.
fn get_on(stream: &mut impl Connection, path: &str, deadline: Instant) -> Result<String, String> {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("sending: {e}"))?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete answer in time; so far: {:?}",
                String::from_utf8_lossy(&response)
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("setting a read timeout: {e}"))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            // Interrupted, or the read timeout ran out: the loop decides.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                return Err(format!(
                    "reading: {e}; so far: {:?}",
                    String::from_utf8_lossy(&response)
                ))
            }
        }
    }
    let response =
        String::from_utf8(response).map_err(|e| format!("the answer is not UTF-8: {e}"))?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(format!("not a 200: {response:?}"));
    }
    Ok(response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned())
}

/// A body parsed as JSON; the error quotes the body.
pub fn json(body: &str) -> Result<Value, String> {
    serde_json::from_str(body).map_err(|e| format!("body {body:?}: {e}"))
}

/// One response read off a connection that may stay open.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The status line and headers, with their final blank line.
    pub headers: String,
    /// The body, `Content-Length` bytes of it.
    pub body: String,
}

impl Response {
    /// Whether the server said it closes the connection after this response.
    pub fn closes(&self) -> bool {
        self.headers
            .to_ascii_lowercase()
            .contains("\r\nconnection: close")
    }

    /// The body parsed as JSON; the error quotes the body.
    pub fn json(&self) -> Result<Value, String> {
        json(&self.body)
    }
}

/// Sends `GET path` on a connection the caller keeps (no `Connection:
/// close`); read the answer with [`read_response`].
pub fn send_get(stream: &mut impl Write, path: &str) -> Result<(), String> {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
        .map_err(|e| format!("sending GET {path}: {e}"))
}

/// [`send_get`], then [`read_response`].
pub fn get_keep_alive(stream: &mut (impl Read + Write), path: &str) -> Result<Response, String> {
    send_get(stream, path)?;
    read_response(stream)
}

/// Reads one response with a `Content-Length` (as axum's JSON answers have)
/// and leaves the connection open; the caller's read timeout bounds each
/// read.
pub fn read_response(stream: &mut impl Read) -> Result<Response, String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream
            .read(&mut byte)
            .map_err(|e| format!("reading a response head: {e}"))?;
        if n == 0 {
            return Err(format!("connection closed in the head: {head:?}"));
        }
        head.push(byte[0]);
    }
    let headers = String::from_utf8(head).map_err(|e| format!("a head that is not ASCII: {e}"))?;
    let status = headers
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status code in {headers:?}"))?;
    let length: usize = headers
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| format!("no Content-Length in {headers:?}"))?;
    let mut body = vec![0; length];
    stream
        .read_exact(&mut body)
        .map_err(|e| format!("reading a body of {length} bytes: {e}"))?;
    let body = String::from_utf8(body).map_err(|e| format!("a body that is not UTF-8: {e}"))?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Starts `GET path` on a new connection now (connected and sent before
/// this returns, so it is queued ahead of any later connection) and reads
/// its answer on a thread of its own, within `timeout`. For requests that
/// must be in flight when something happens.
pub fn in_flight(
    addr: &str,
    path: &str,
    timeout: Duration,
) -> std::thread::JoinHandle<Result<Response, String>> {
    let connected = std::net::TcpStream::connect(addr)
        .map_err(|e| format!("connecting to {addr}: {e}"))
        .and_then(|mut stream| {
            stream
                .set_read_timeout(Some(timeout))
                .map_err(|e| format!("setting a read timeout: {e}"))?;
            send_get(&mut stream, path)?;
            Ok(stream)
        });
    let path = path.to_owned();
    std::thread::spawn(move || {
        let mut stream = connected?;
        let response = read_response(&mut stream)?;
        if response.status != 200 {
            return Err(format!("GET {path}: status {}", response.status));
        }
        Ok(response)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server on 127.0.0.1:0 that reads one request head and writes
    /// `answer`, then closes unless `hold` (then it waits for the client).
    fn serve_once(answer: &'static [u8], hold: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = listener.local_addr().expect("address").to_string();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accepting");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).expect("reading the request");
                head.push(byte[0]);
            }
            stream.write_all(answer).expect("answering");
            if hold {
                let _ = stream.read_to_end(&mut Vec::new());
            }
        });
        addr
    }

    #[test]
    fn a_200_gives_its_body() {
        let addr = serve_once(b"HTTP/1.1 200 OK\r\n\r\n{\"generation\": 3}", false);
        let body = get_json(&addr, "/", TIMEOUT).expect("a 200");
        assert_eq!(body["generation"], 3);
    }

    #[test]
    fn another_status_is_an_error_carrying_the_answer() {
        let addr = serve_once(b"HTTP/1.1 503 Busy\r\n\r\nlater", false);
        let err = get(&addr, "/x", TIMEOUT).expect_err("not a 200");
        assert!(
            err.contains("GET /x on") && err.contains("503 Busy"),
            "{err}"
        );
    }

    #[test]
    fn an_answer_that_never_ends_misses_the_deadline() {
        let addr = serve_once(b"HTTP/1.1 200 OK\r\n\r\npartial", true);
        let started = Instant::now();
        let err = get(&addr, "/", Duration::from_millis(200)).expect_err("no end");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(err.contains("partial"), "{err}");
    }

    #[test]
    fn a_kept_connection_reads_one_framed_response() {
        let addr = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            true,
        );
        let mut stream = TcpStream::connect(&addr).expect("connecting");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let response = get_keep_alive(&mut stream, "/").expect("a response");
        assert_eq!(response.status, 200);
        assert!(response.closes());
        assert_eq!(response.json().expect("JSON"), serde_json::json!({}));
    }
}
