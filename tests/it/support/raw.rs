//! Raw TCP helpers for protocol-level and hostile-client tests.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Limit for connecting and for each read helper.
pub const TIMEOUT: Duration = Duration::from_secs(5);

pub async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| panic!("connect {addr}: timed out"))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// Connects, writes `bytes`, then reads until EOF (or error, or 5 s) and returns what arrived.
/// A server may answer and close before it has read all of an oversized request, so a write
/// that finds the connection closed still reads what was answered.
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = connect(addr).await;
    if let Err(e) = stream.write_all(bytes).await {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        assert!(
            matches!(e.kind(), BrokenPipe | ConnectionReset),
            "write to {addr}: {e}"
        );
    }
    read_to_end(&mut stream).await
}

/// Reads until EOF, a read error, or 5 s have passed; returns what arrived.
pub async fn read_to_end(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, async {
        let mut buf = [0; 8192];
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    out
}

/// Reads until `needle` has been seen (e.g. `b"\r\n\r\n"` for a response head); returns all bytes
/// read, which may run past the needle. Panics on EOF, error or after 5 s.
pub async fn read_until(stream: &mut (impl AsyncRead + Unpin), needle: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let found = tokio::time::timeout(TIMEOUT, async {
        let mut buf = [0; 8192];
        while !out.windows(needle.len()).any(|w| w == needle) {
            match stream.read(&mut buf).await {
                Ok(0) => return Err("EOF".to_owned()),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    })
    .await;
    let text = || String::from_utf8_lossy(&out).into_owned();
    match found {
        Ok(Ok(())) => out,
        Ok(Err(e)) => panic!(
            "{e} before {:?}; got {:?}",
            String::from_utf8_lossy(needle),
            text()
        ),
        Err(_) => panic!(
            "no {:?} within {TIMEOUT:?}; got {:?}",
            String::from_utf8_lossy(needle),
            text()
        ),
    }
}
