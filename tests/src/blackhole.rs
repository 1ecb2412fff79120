//! A loopback address whose TCP connects hang, standing for an origin behind a firewall that
//! drops packets: a listener with the smallest accept queue, filled and never accepted, so the
//! kernel drops every further SYN. Loopback only; nothing here sends data.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail};
use socket2::{Domain, Protocol, Socket, Type};

/// How long a connect must stall before the queue counts as full.
const STALL: Duration = Duration::from_millis(300);

/// The listener and the connections that fill its queue; both closed on drop.
pub struct Blackhole {
    addr: SocketAddr,
    _listener: Socket,
    _queued: Vec<TcpStream>,
}

impl Blackhole {
    /// Listen on a free loopback port and fill the accept queue, proving that a further
    /// connect stalls before returning.
    pub fn start() -> anyhow::Result<Blackhole> {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        listener.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        // Linux admits backlog + 1 connections before it drops SYNs.
        listener.listen(0)?;
        let addr = listener
            .local_addr()?
            .as_socket()
            .context("the listener has an IP address")?;
        let mut queued = Vec::new();
        for _ in 0..8 {
            match TcpStream::connect_timeout(&addr, STALL) {
                Ok(stream) => queued.push(stream),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Ok(Blackhole {
                        addr,
                        _listener: listener,
                        _queued: queued,
                    });
                }
                Err(e) => return Err(e).context("filling the accept queue"),
            }
        }
        bail!("{addr} kept accepting connects: its accept queue never filled")
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
