//! A plain HTTP/1.0 GET over loopback, for the tests that read `memtrace serve` and
//! Prometheus's API (no client library needed for one request at a time).
#![allow(dead_code, reason = "each test file uses a different part of this module")]

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

/// (status, body) of `GET path` at `addr` (`127.0.0.1:PORT`); None when nothing answers.
pub fn get(addr: &str, path: &str) -> Option<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, raw[head_end + 4..].to_vec()))
}

/// `get`'s body as text, for a 200 answer.
pub fn get_text(addr: &str, path: &str) -> Option<String> {
    match get(addr, path)? {
        (200, body) => Some(String::from_utf8_lossy(&body).into_owned()),
        _ => None,
    }
}

/// Percent-encodes a query parameter's value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
