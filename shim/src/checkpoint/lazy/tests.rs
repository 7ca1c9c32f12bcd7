use super::dest::{commit, pull};
use super::*;

fn iov(cmd: u32) -> [u8; IOV_SIZE] {
    let mut b = [0u8; IOV_SIZE];
    b[..4].copy_from_slice(&cmd.to_le_bytes());
    b
}

/// A relay on a free port, connected to a fake CRIU page server on its loopback port: the
/// fake answers each request with 4 KiB, the close with a status word, and reports whether
/// the relay had called `abort` when it saw the end of the destination's stream.
async fn relay_and_criu() -> (
    PageRelay,
    SocketAddr,
    Arc<AtomicBool>,
    tokio::task::JoinHandle<bool>,
) {
    let mut relay = PageRelay::bind("127.0.0.1:0").await.unwrap();
    let public = relay.listener.local_addr().unwrap();
    let criu = TcpListener::bind(("127.0.0.1", relay.criu_port))
        .await
        .unwrap();
    let aborted = Arc::new(AtomicBool::new(false));
    let seen = aborted.clone();
    let fake = tokio::spawn(async move {
        let (mut s, _) = criu.accept().await.unwrap();
        let mut req = [0u8; IOV_SIZE];
        loop {
            if s.read_exact(&mut req).await.is_err() {
                // The end of the destination's stream: was CRIU killed before it?
                return seen.load(Ordering::SeqCst);
            }
            if command(&req) == PS_IOV_CLOSE {
                s.write_all(&0i32.to_le_bytes()).await.unwrap();
            } else {
                s.write_all(&[7u8; 4096]).await.unwrap();
            }
        }
    });
    relay.connect_criu().await.unwrap();
    (relay, public, aborted, fake)
}

/// The relay serving `peer` (any, when None), waiting `connect` for it; `aborted` is set
/// when it kills CRIU.
fn serving(
    relay: PageRelay,
    aborted: &Arc<AtomicBool>,
    peer: Option<std::net::IpAddr>,
    connect: Duration,
) -> tokio::task::JoinHandle<Result<Transfer>> {
    let flag = aborted.clone();
    tokio::spawn(async move {
        relay
            .serve(
                peer,
                connect,
                Duration::from_secs(5),
                move || flag.store(true, Ordering::SeqCst),
                || {},
            )
            .await
    })
}

#[tokio::test]
async fn the_end_reaches_criu_only_after_the_destination_closed() {
    let (relay, public, aborted, fake) = relay_and_criu().await;
    let serve = serving(relay, &aborted, None, Duration::from_secs(5));
    let mut dest = TcpStream::connect(public).await.unwrap();
    dest.write_all(&iov(7)).await.unwrap();
    let mut page = vec![0u8; 4096];
    dest.read_exact(&mut page).await.unwrap();
    dest.write_all(&iov(PS_IOV_CLOSE)).await.unwrap();
    let mut status = [0u8; 4];
    dest.read_exact(&mut status).await.unwrap();
    drop(dest);
    let transfer = serve.await.unwrap().unwrap();
    assert_eq!(transfer.bytes, 4096 + 4);
    assert!(
        !fake.await.unwrap(),
        "CRIU was killed after a complete transfer"
    );
    assert!(!aborted.load(Ordering::SeqCst));
}

#[tokio::test]
async fn after_the_close_criu_is_let_finish_whatever_happens() {
    let (relay, public, aborted, fake) = relay_and_criu().await;
    let serve = serving(relay, &aborted, None, Duration::from_secs(5));
    let dest = std::net::TcpStream::connect(public).unwrap();
    let mut d = &dest;
    std::io::Write::write_all(&mut d, &iov(PS_IOV_CLOSE)).unwrap();
    // Gone with a reset, without reading CRIU's answer: the destination has every page.
    reset_on_close(dest.as_raw_fd());
    drop(dest);
    serve.await.unwrap().unwrap();
    assert!(!fake.await.unwrap(), "CRIU was killed after the close");
    assert!(!aborted.load(Ordering::SeqCst));
}

#[tokio::test]
async fn a_destination_gone_before_the_close_kills_criu_first() {
    let (relay, public, aborted, fake) = relay_and_criu().await;
    let serve = serving(relay, &aborted, None, Duration::from_secs(5));
    let mut dest = TcpStream::connect(public).await.unwrap();
    dest.write_all(&iov(7)).await.unwrap();
    let mut page = vec![0u8; 4096];
    dest.read_exact(&mut page).await.unwrap();
    // Half a request, then gone.
    dest.write_all(&iov(7)[..10]).await.unwrap();
    drop(dest);
    let err = serve.await.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("before it had every page"),
        "{err}"
    );
    assert!(
        fake.await.unwrap(),
        "CRIU saw the end before it was killed: it would kill the tasks"
    );
}

#[tokio::test]
async fn a_destination_that_never_connects_is_a_deadline() {
    let (relay, _public, aborted, _fake) = relay_and_criu().await;
    let err = serving(relay, &aborted, None, Duration::from_millis(50))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded(_)), "{err}");
    assert!(aborted.load(Ordering::SeqCst));
}

/// The destination's side: the daemon's close is answered by the shim and never reaches the
/// source; the source gets the close only from [`commit`].
#[tokio::test]
async fn the_daemons_close_is_kept_from_the_source_until_commit() {
    let source = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let source_addr = source.local_addr().unwrap();
    let fake_source = tokio::spawn(async move {
        let (mut s, _) = source.accept().await.unwrap();
        let mut req = [0u8; IOV_SIZE];
        let mut commands = Vec::new();
        while s.read_exact(&mut req).await.is_ok() {
            commands.push(command(&req));
            if command(&req) == PS_IOV_CLOSE {
                s.write_all(&0i32.to_le_bytes()).await.unwrap();
            } else {
                s.write_all(&[9u8; 4096]).await.unwrap();
            }
        }
        commands
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let daemon_addr = listener.local_addr().unwrap();
    // No daemon process: the pid is one no process has (pull kills it only on failure).
    let pulling = tokio::spawn(pull(
        listener,
        source_addr,
        i32::MAX,
        Duration::from_secs(5),
    ));
    let mut daemon = TcpStream::connect(daemon_addr).await.unwrap();
    daemon.write_all(&iov(7)).await.unwrap();
    let mut page = vec![0u8; 4096];
    daemon.read_exact(&mut page).await.unwrap();
    daemon.write_all(&iov(PS_IOV_CLOSE)).await.unwrap();
    let mut status = [1u8; 4];
    daemon.read_exact(&mut status).await.unwrap();
    assert_eq!(
        i32::from_le_bytes(status),
        0,
        "the shim answers the daemon's close"
    );
    drop(daemon);
    let pulled = pulling.await.unwrap().unwrap();
    assert_eq!(pulled.transfer.bytes, 4096);
    commit(pulled.upstream).await.unwrap();
    assert_eq!(fake_source.await.unwrap(), vec![7, PS_IOV_CLOSE]);
}

#[tokio::test]
async fn only_the_destination_is_served() {
    let (relay, public, aborted, _fake) = relay_and_criu().await;
    // The destination is 127.0.0.2: a connection from 127.0.0.1 is closed unserved.
    let serve = serving(
        relay,
        &aborted,
        Some("127.0.0.2".parse().unwrap()),
        Duration::from_millis(300),
    );
    let mut intruder = TcpStream::connect(public).await.unwrap();
    let _ = intruder.write_all(&iov(7)).await;
    let mut b = [0u8; 1];
    assert_eq!(intruder.read(&mut b).await.unwrap_or(0), 0, "served a page");
    let err = serve.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::DeadlineExceeded(_)), "{err}");
}

#[test]
fn the_pipe_check_names_the_sysctl() {
    // Either this host allows CRIU's pipes, or the error says how to.
    if let Err(e) = check_pipe_size() {
        assert!(e.to_string().contains("fs.pipe-max-size"), "{e}");
    }
}
