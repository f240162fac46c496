//! Serving, and stopping without failing a request: the listener, its
//! connections, and the drain on SIGTERM.
//!
//! A replica that is told to stop stops taking new connections at once
//! (a load balancer that finds the port closed sends the request to
//! another replica, which is safe for any method: nothing reached this
//! one), says `/ready` 503, and keeps serving the connections already
//! open, each answer saying `Connection: close`. It does not close an idle
//! connection at once: a load balancer may be sending on it at that very
//! moment, and a request that reached a replica is not retried elsewhere
//! when it may have started a run. It waits until the connections are gone
//! (a load balancer closes its idle ones after its own keep-alive timeout)
//! or [`LINGER`] has passed, then stops taking runs and gives those in
//! flight what is left of the grace.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::app::{App, AppState};
use crate::config::Config;

/// How long connections already open are served after SIGTERM, at most,
/// before idle ones are closed: above any load balancer's keep-alive
/// timeout for its connections to the replicas (nginx's is set to 1 s in
/// the shipped configuration).
pub const LINGER: Duration = Duration::from_secs(3);

/// A server bound to its port; [`Server::run`] serves until `shutdown`.
pub struct Server {
    app: Arc<App>,
    listener: TcpListener,
}

impl Server {
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let address = SocketAddr::new(config.host, config.port);
        let app = Arc::new(App::build(config).await?);
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("could not listen on {address}"))?;
        Ok(Server { app, listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn app(&self) -> Arc<App> {
        Arc::clone(&self.app)
    }

    /// Serves until `shutdown` resolves, then drains (see the module's
    /// comment): the listener closes, connections already open are served
    /// until they go or for [`LINGER`], runs in flight get what is left of
    /// the grace and the rest are interrupted; then the last connections
    /// close and the database pool with them.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Server { app, listener } = self;
        let address = listener.local_addr()?;
        tracing::info!(
            address = %address,
            mode = app.config.mode.as_str(),
            role = app.config.role.as_str(),
            "listening"
        );
        let router = crate::routes::router(AppState(Arc::clone(&app)));
        let close_listener = CancellationToken::new();
        let stop_serving = CancellationToken::new();
        let open = Arc::new(AtomicUsize::new(0));
        let listener = DrainingListener {
            listener: Some(listener),
            address,
            closed: close_listener.clone(),
            open: Arc::clone(&open),
        };
        // As a make-service, each connection gets a cheap clone of the router;
        // a bare `Router` would be rebuilt per connection (`with_state`), about
        // 8 KB each, which 10,000 open streams notice.
        let server = axum::serve(listener, router.into_make_service())
            .with_graceful_shutdown(stop_serving.clone().cancelled_owned());
        let mut server = tokio::spawn(async move { server.await });

        tokio::select! {
            () = shutdown => {}
            result = &mut server => {
                // The server stopped on its own: that is an error.
                result.context("the server task failed")?.context("the server failed")?;
                anyhow::bail!("the server stopped unexpectedly");
            }
        }
        let draining_since = Instant::now();
        let grace = app.config.shutdown_grace;
        tracing::info!(
            runs_in_flight = app.engine.active_runs(),
            connections = open.load(Ordering::Relaxed),
            grace_s = grace.as_secs_f64(),
            "shutting down: no new connections; open ones are served until they close"
        );
        app.set_draining();
        close_listener.cancel();
        let linger = LINGER.min(grace);
        while open.load(Ordering::Relaxed) > 0 && draining_since.elapsed() < linger {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Idle connections close now; those with a request in flight
        // close once it is answered.
        stop_serving.cancel();
        app.engine
            .shutdown(grace.saturating_sub(draining_since.elapsed()))
            .await;
        app.engine.release_lease().await;
        if let Some(sandboxes) = app.engine.sandboxes() {
            sandboxes.destroy_all().await;
        }
        // Handlers answered as their runs ended; give the last responses
        // (and streams of runs executing elsewhere) what is left of the
        // grace, and a moment, to be written.
        let last = grace.saturating_sub(draining_since.elapsed()) + Duration::from_secs(2);
        match tokio::time::timeout(last, &mut server).await {
            Ok(result) => result
                .context("the server task failed")?
                .context("the server failed")?,
            Err(_) => {
                tracing::warn!("connections still open after the drain; closing them");
                server.abort();
            }
        }
        app.engine.store().close().await;
        crate::observability::traces::flush().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The listener, closed on the drain while its connections go on; counts
/// the connections open.
struct DrainingListener {
    /// `None` once closed: connecting is refused from then on.
    listener: Option<TcpListener>,
    address: SocketAddr,
    closed: CancellationToken,
    open: Arc<AtomicUsize>,
}

impl axum::serve::Listener for DrainingListener {
    type Io = CountedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some(listener) = &self.listener else {
                return std::future::pending().await;
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = self.closed.cancelled() => {
                    // Dropped, not just left unpolled: the kernel then
                    // refuses new connections instead of queueing them.
                    self.listener = None;
                    continue;
                }
            };
            match accepted {
                Ok((stream, address)) => {
                    // No Nagle: an answer written in parts (a stream's
                    // events, a wait's heartbeat then its JSON) must not
                    // sit waiting for the client's delayed ACK, 40 ms on
                    // Linux, before its last part leaves.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
                    }
                    self.open.fetch_add(1, Ordering::Relaxed);
                    let counted = CountedStream {
                        stream,
                        open: Arc::clone(&self.open),
                    };
                    return (counted, address);
                }
                // As axum's own listener does: out of descriptors or the
                // like is waited out, not fatal.
                Err(e) => {
                    tracing::error!(error = %e, "could not accept a connection");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.address)
    }
}

/// A connection, counted among those open until it is dropped.
struct CountedStream {
    stream: TcpStream,
    open: Arc<AtomicUsize>,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Every answer given while draining says `Connection: close`: the client
/// (a load balancer) sends its next request on a new connection, which
/// reaches another replica.
pub(crate) async fn close_when_draining(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let mut response = next.run(request).await;
    if state.is_draining() {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled, so that a signal arriving
/// during start-up is not lost to the default action.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let signal = termination_signal()?;
    Ok(async move {
        signal.await;
    })
}

/// Resolves to the number of the first SIGTERM or SIGINT received after
/// this call; each call listens on its own.
pub fn termination_signal() -> std::io::Result<impl Future<Output = i32> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {
                tracing::info!(signal = "SIGINT", "signal received");
                nix::sys::signal::Signal::SIGINT as i32
            }
            _ = terminate.recv() => {
                tracing::info!(signal = "SIGTERM", "signal received");
                nix::sys::signal::Signal::SIGTERM as i32
            }
        }
    })
}
