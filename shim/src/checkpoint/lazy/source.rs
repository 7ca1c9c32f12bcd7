//! The source's side: the page server the destination dials, in front of CRIU's own.

use super::*;

/// The page server the destination connects to, in front of CRIU's.
pub struct PageRelay {
    pub(super) listener: TcpListener,
    pub(super) criu_port: u16,
    /// The relay's one connection to CRIU's page server, made as soon as CRIU is ready (CRIU
    /// accepts exactly one, and no one else may take it).
    criu: Option<TcpStream>,
}

impl PageRelay {
    /// Listens on `addr` (`ADDRESS:PORT`, the address the destination
    /// dials) and picks a free loopback port for CRIU's own page server.
    pub async fn bind(addr: &str) -> Result<Self> {
        let public: SocketAddr = addr.parse().map_err(|e| {
            Error::InvalidArgument(format!("page server address {addr:?}: {e} (want IP:PORT)"))
        })?;
        let listener = TcpListener::bind(public)
            .await
            .map_err(Error::io(format!("listen on {public} for the destination")))?;
        let criu_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(Error::io("pick a port for CRIU's page server"))?
            .port();
        Ok(Self {
            listener,
            criu_port,
            criu: None,
        })
    }

    /// What runc is given as `--page-server` (CRIU keeps only the port in a
    /// lazy dump; the config file keeps it on loopback).
    pub fn criu_page_server(&self) -> String {
        format!("127.0.0.1:{}", self.criu_port)
    }

    /// Writes the CRIU config of the dump into `work`: its page server on loopback, and the
    /// network lock the shim knows how to remove should CRIU be stopped.
    pub fn write_config(&self, work: &Path) -> Result<PathBuf> {
        let path = work.join(DUMP_CONFIG);
        std::fs::write(&path, "address 127.0.0.1\nnetwork-lock iptables\n")
            .map_err(Error::io(format!("write {}", path.display())))?;
        Ok(path)
    }

    /// Takes CRIU's one connection, once it is ready. Closed abortively (SO_LINGER 0): if the
    /// shim dies, CRIU reads a reset, not the end of a transfer, and lets the tasks go alive.
    pub async fn connect_criu(&mut self) -> Result<()> {
        let s = TcpStream::connect(("127.0.0.1", self.criu_port))
            .await
            .map_err(Error::io("connect to CRIU's page server"))?;
        reset_on_close(s.as_raw_fd());
        self.criu = Some(s);
        Ok(())
    }

    /// Relays one destination to CRIU's page server until the destination
    /// has every page. Before the destination's close, any failure runs
    /// `abort` (which kills CRIU) while CRIU's connection is still open, so
    /// that CRIU never takes the failure for the end of the transfer and
    /// kills the tasks. After the close CRIU is let finish whatever happens:
    /// the destination runs with every page.
    ///
    /// Only `peer` (when given) is served: a connection from anywhere else is closed, and the
    /// wait goes on.
    /// `before_end` runs once the destination closed, before CRIU reads the end it waits for.
    pub async fn serve(
        self,
        peer: Option<std::net::IpAddr>,
        connect_timeout: Duration,
        transfer_timeout: Duration,
        abort: impl Fn(),
        before_end: impl Fn(),
    ) -> Result<Transfer> {
        let Some(criu) = self.criu else {
            abort();
            return Err(Error::Internal(
                "the relay has no connection to CRIU".into(),
            ));
        };
        let t0 = Instant::now();
        let accepted = tokio::time::timeout(connect_timeout, async {
            loop {
                match self.listener.accept().await {
                    Ok((_, from)) if peer.is_some_and(|p| p != from.ip()) => {
                        warn!("lazy pages: refused a connection from {from} (not the destination)");
                    }
                    other => return other,
                }
            }
        })
        .await;
        drop(self.listener);
        let (dest, from) = match accepted {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                abort();
                return Err(Error::io("accept the destination's connection")(e));
            }
            Err(_) => {
                abort();
                return Err(Error::DeadlineExceeded(format!(
                    "the destination did not connect to the page server within {connect_timeout:?}"
                )));
            }
        };
        let connect_ms = t0.elapsed().as_secs_f64() * 1000.0;
        info!("lazy pages: destination {from} connected");
        keepalive(&dest);
        let mut transfer = relay_to_criu(dest, criu, transfer_timeout, abort, before_end).await?;
        transfer.connect_ms = connect_ms;
        Ok(transfer)
    }
}

/// The source's relay: the destination's requests up to CRIU, pages down, until the
/// destination's close, which commits the move (see [`PageRelay::serve`]).
async fn relay_to_criu(
    dest: TcpStream,
    criu: TcpStream,
    transfer_timeout: Duration,
    abort: impl Fn(),
    before_end: impl Fn(),
) -> Result<Transfer> {
    let _ = dest.set_nodelay(true);
    let _ = criu.set_nodelay(true);
    let t1 = Instant::now();
    let closed = AtomicBool::new(false);
    let (mut dest_rd, mut dest_wr) = dest.into_split();
    let (mut criu_rd, mut criu_wr) = criu.into_split();
    // Destination → CRIU: requests, checked for the close that ends the transfer. Once the
    // close is through, any end of the destination's stream is the end CRIU waits for.
    let up = async {
        let mut iov = [0u8; IOV_SIZE];
        loop {
            let read = dest_rd.read_exact(&mut iov).await;
            if closed.load(Ordering::SeqCst) {
                if read.is_ok() {
                    warn!("lazy pages: the destination sent more after its close");
                }
                before_end();
                let _ = criu_wr.shutdown().await;
                return Ok::<(), String>(());
            }
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(
                        "the destination closed the connection before it had every page".into(),
                    )
                }
                Err(e) => return Err(format!("the destination's connection failed: {e}")),
            }
            let cmd = command(&iov);
            if cmd == PS_IOV_CLOSE || cmd == PS_IOV_FORCE_CLOSE {
                closed.store(true, Ordering::SeqCst);
            }
            if let Err(e) = criu_wr.write_all(&iov).await {
                return Err(format!("CRIU's page server: {e}"));
            }
        }
    };
    // CRIU → destination: pages, counted; after the close, CRIU's answer is passed on if it
    // can be, and CRIU is read to its end.
    let down = async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut n_total = 0u64;
        let mut dest_gone = false;
        loop {
            let n = match criu_rd.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => return Err(format!("CRIU's page server: {e}")),
            };
            if n == 0 {
                let _ = dest_wr.shutdown().await;
                return match closed.load(Ordering::SeqCst) {
                    true => Ok(n_total),
                    false => Err("CRIU's page server closed the connection".into()),
                };
            }
            if !dest_gone {
                match dest_wr.write_all(&buf[..n]).await {
                    Ok(()) => n_total += n as u64,
                    Err(_) if closed.load(Ordering::SeqCst) => dest_gone = true,
                    Err(e) => return Err(format!("sending pages to the destination failed: {e}")),
                }
            }
        }
    };
    tokio::pin!(up);
    tokio::pin!(down);
    let ended = async {
        tokio::select! {
            r = &mut up => match r {
                // The close went through and CRIU got its end: it answers, then finishes.
                Ok(()) => (&mut down).await,
                Err(e) => Err(e),
            },
            // Ok only after the close, when CRIU finished.
            r = &mut down => r,
        }
    };
    tokio::pin!(ended);
    // Bounded until the close; after it, CRIU ends on its own (it reads the end it waits for).
    let deadline = tokio::time::Instant::now() + transfer_timeout;
    let relayed = tokio::select! {
        r = &mut ended => r,
        _ = tokio::time::sleep_until(deadline) => {
            if closed.load(Ordering::SeqCst) {
                (&mut ended).await
            } else {
                Err(format!("the destination did not take every page within {transfer_timeout:?}"))
            }
        }
    };
    let transfer_ms = t1.elapsed().as_secs_f64() * 1000.0;
    match relayed {
        Ok(bytes) => Ok(Transfer {
            bytes,
            connect_ms: 0.0,
            transfer_ms,
        }),
        Err(why) if closed.load(Ordering::SeqCst) => {
            // Committed: the destination has every page; CRIU finishes (and kills the tasks).
            warn!("lazy pages: after the destination's close: {why}");
            Ok(Transfer {
                bytes: 0,
                connect_ms: 0.0,
                transfer_ms,
            })
        }
        Err(why) => {
            abort();
            Err(Error::Internal(format!("lazy migration failed: {why}")))
        }
    }
}
