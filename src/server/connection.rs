//! One accepted HTTP connection: HTTP/1.1 with upgrades, the deadlines
//! of every request, the refusal of a connection over a cap, and the
//! connection's places under the caps for as long as its socket lives.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::ServiceExt;

use super::ops::{Ops, is_ops_path, shutting_down};
use crate::limits::{ConnRefused, ConnSlot, ConnectionLimiter, RefusalSlot};
use crate::shutdown::Listener;

/// The deadlines of every HTTP request.
#[derive(Debug, Clone, Copy)]
pub(super) struct HttpTimes {
    pub header: Duration,
    pub body: Duration,
    pub request: Duration,
}

/// How long a refused connection gets to send the request its refusal
/// answers, and to take the answer.
const REFUSAL_TIME: Duration = Duration::from_secs(2);

/// How long past the request deadline an answer may take to be written
/// before its connection is closed.
const WRITE_GRACE: Duration = Duration::from_secs(5);

/// One accepted HTTP connection.
pub(super) struct Connection {
    pub app: Router,
    pub ops: Arc<Ops>,
    pub peer: SocketAddr,
    pub http: HttpTimes,
    /// Tells it the node is draining; held until the connection ends.
    pub draining: Listener,
    pub conns: Arc<ConnectionLimiter>,
    pub trusted: Arc<[IpAddr]>,
    pub serves_proxy: bool,
    /// Its place under the connection caps.
    pub slot: Option<ConnSlot>,
    /// Over a cap: why, and the place its refusal is answered in.
    pub refusal: Option<(ConnRefused, RefusalSlot)>,
}

impl Connection {
    /// Serves HTTP/1.1 (with upgrades, for WebSockets) on `io`. A client
    /// that does not finish its request headers within the deadline is
    /// dropped, so slow handshakes cannot pile up; one whose request (body
    /// and answer included) takes longer than the request deadline is
    /// dropped too.
    pub async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            app,
            ops,
            peer,
            http,
            mut draining,
            conns,
            trusted,
            serves_proxy,
            slot,
            refusal,
        } = self;
        let (refused, refusal_slot) = match refusal {
            Some((why, r)) => (Some(why), Some(r)),
            None => (None, None),
        };
        let gate = Arc::new(Gate {
            app,
            ops,
            peer,
            http,
            conns,
            trusted,
            serves_proxy,
            refused,
            clock: Arc::new(Clock::default()),
            upgraded: Arc::new(Mutex::new(None)),
        });
        // The connection's places under the caps go with the socket, also
        // into a WebSocket session after an upgrade.
        let io = Held {
            io,
            _slot: slot,
            _refusal: refusal_slot,
            _forwarded: Arc::clone(&gate.upgraded),
        };
        let clock = Arc::clone(&gate.clock);
        let g = Arc::clone(&gate);
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            Arc::clone(&g).handle(req)
        });
        // A connection accepted while draining answers one request (a
        // probe, typically) and closes; the others finish the request in
        // progress when the drain starts. A refused one answers one request.
        let accepted_draining = draining.is_stopping();
        let header_timeout = match refused {
            Some(_) => http.header.min(REFUSAL_TIME),
            None => http.header,
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            // A refusal says `Connection: close` itself (keep-alive off would
            // spoil the upgrade that carries a 4429).
            .keep_alive(!accepted_draining)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let mut conn = std::pin::pin!(conn);
        let one_only = accepted_draining || refused.is_some();
        let serving = async {
            if one_only {
                return conn.as_mut().await;
            }
            tokio::select! {
                r = conn.as_mut() => r,
                _ = draining.stopping() => {
                    // Accepted just before the drain, its first request not
                    // in yet: it still gets its answer (a probe, typically);
                    // the header timeout bounds the wait.
                    if clock.requests() == 0 {
                        tokio::select! {
                            r = conn.as_mut() => return r,
                            _ = clock.first() => {}
                        }
                    }
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            }
        };
        // A request (its answer included) that outlives the deadline ends
        // the connection: a client reading its answer slowly holds nothing.
        let result = tokio::select! {
            r = serving => r,
            _ = clock.overdue(http.request + WRITE_GRACE) => {
                tracing::debug!(%peer, "request overdue: connection closed");
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
        }
    }
}

/// What every request on one connection goes through.
struct Gate {
    app: Router,
    ops: Arc<Ops>,
    peer: SocketAddr,
    http: HttpTimes,
    conns: Arc<ConnectionLimiter>,
    trusted: Arc<[IpAddr]>,
    serves_proxy: bool,
    /// Set when the connection is over a cap: every request is refused.
    refused: Option<ConnRefused>,
    clock: Arc<Clock>,
    /// A forwarded client's place, taken by its WebSocket for as long as
    /// the connection lives.
    upgraded: Arc<Mutex<Option<ConnSlot>>>,
}

impl Gate {
    async fn handle(
        self: Arc<Self>,
        mut req: hyper::Request<Incoming>,
    ) -> Result<Response, std::convert::Infallible> {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        if let Some(why) = self.refused {
            return Ok(self.refuse(req, why));
        }
        if self.ops.is_draining() && !is_ops_path(req.uri().path()) {
            return Ok(shutting_down());
        }
        // Behind a trusted proxy each client is capped by its forwarded
        // address, request by request (the proxy's own connections are not
        // one client).
        let mut forwarded = None;
        if self.conns.caps_addresses() && self.trusted.contains(&self.peer.ip()) {
            let client = crate::edge::client_ip_from(self.peer.ip(), req.headers(), &self.trusted);
            if client != self.peer.ip() {
                match self.conns.admit_forwarded(client) {
                    Ok(slot) => forwarded = Some(slot),
                    Err(why) => {
                        crate::metrics::global().connection_refused(why.label());
                        return Ok(self.refuse(req, why));
                    }
                }
            }
        }
        let upgrade = crate::websocket::upgrade::is_upgrade(req.headers());
        let seq = self.clock.start();
        let (parts, body) = req.into_parts();
        let body_done = Arc::new(AtomicBool::new(body.is_end_stream()));
        let body = Body::new(Tracked {
            inner: body,
            done: Arc::clone(&body_done),
        });
        let req = axum::http::Request::from_parts(parts, body);
        let http = self.http;
        let body_late = async {
            tokio::time::sleep(http.body).await;
            if body_done.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
        };
        let resp = tokio::select! {
            resp = self.app.clone().oneshot(req) => match resp {
                Ok(resp) => resp,
                Err(never) => match never {},
            },
            _ = body_late => {
                crate::metrics::global().http_timeout("body");
                tracing::debug!(peer = %self.peer, "request body not received in time");
                (
                    StatusCode::REQUEST_TIMEOUT,
                    [(header::CONNECTION, "close")],
                    "request body not received in time",
                )
                    .into_response()
            }
            _ = tokio::time::sleep(http.request) => {
                crate::metrics::global().http_timeout("request");
                tracing::debug!(peer = %self.peer, "request not answered in time");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "5"), (header::CONNECTION, "close")],
                    "request took too long",
                )
                    .into_response()
            }
        };
        if upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            *self.upgraded.lock().unwrap_or_else(PoisonError::into_inner) = forwarded.take();
        }
        let finish = Finish {
            clock: Arc::clone(&self.clock),
            seq,
        };
        Ok(resp.map(|inner| {
            Body::new(Finishing {
                inner,
                finish: Some(finish),
            })
        }))
    }

    /// The answer to a request over a connection cap: 503 with
    /// `Retry-After`, or, for a WebSocket on a proxy node, the upgrade and
    /// a close frame with 4429, which the console page can show (a browser
    /// hides why an upgrade failed).
    fn refuse(&self, mut req: hyper::Request<Incoming>, why: ConnRefused) -> Response {
        // Counted in /metrics; one line each would flood the log in an attack.
        tracing::debug!(client = %self.peer, reason = %why, "connection refused: over a connection cap");
        if self.serves_proxy
            && let Ok(accepted) = crate::websocket::upgrade::check(req.method(), req.headers())
            && let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>()
        {
            tokio::spawn(async move {
                let Ok(Ok(upgraded)) = tokio::time::timeout(REFUSAL_TIME, on_upgrade).await else {
                    return;
                };
                let mut w = crate::websocket::stream::Writer::new(TokioIo::new(upgraded));
                let _ = tokio::time::timeout(REFUSAL_TIME, async {
                    let _ = w
                        .close(crate::proxy::close::TOO_MANY, &why.to_string())
                        .await;
                    let _ = w.shutdown().await;
                })
                .await;
            });
            return accepted.response();
        }
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5"), (header::CONNECTION, "close")],
            format!("{why}, try again later"),
        )
            .into_response()
    }
}

/// When the request in progress on a connection started, so that one
/// taking too long (a client that reads its answer slowly, say) can be cut.
#[derive(Default)]
struct Clock {
    state: Mutex<(u64, Option<tokio::time::Instant>)>,
    started: tokio::sync::Notify,
}

impl Clock {
    fn start(&self) -> u64 {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.0 += 1;
        st.1 = Some(tokio::time::Instant::now());
        self.started.notify_waiters();
        st.0
    }

    /// How many requests the connection has begun.
    fn requests(&self) -> u64 {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).0
    }

    /// Completes once the connection's first request has begun.
    async fn first(&self) {
        loop {
            let started = self.started.notified();
            let mut started = std::pin::pin!(started);
            started.as_mut().enable();
            if self.requests() > 0 {
                return;
            }
            started.await;
        }
    }

    fn finish(&self, seq: u64) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.0 == seq {
            st.1 = None;
        }
    }

    fn current(&self) -> Option<(u64, tokio::time::Instant)> {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.1.map(|t| (st.0, t))
    }

    /// Completes once a request has been in progress for `limit`.
    async fn overdue(&self, limit: Duration) {
        loop {
            let started = self.started.notified();
            let mut started = std::pin::pin!(started);
            started.as_mut().enable();
            match self.current() {
                None => started.await,
                Some((seq, since)) => {
                    tokio::time::sleep_until(since + limit).await;
                    if self.current().is_some_and(|(s, _)| s == seq) {
                        return;
                    }
                }
            }
        }
    }
}

/// Ends the clock's request when the answer has been sent (or dropped).
struct Finish {
    clock: Arc<Clock>,
    seq: u64,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.clock.finish(self.seq);
    }
}

/// An answer body that ends its request on the clock when it is done.
struct Finishing {
    inner: Body,
    finish: Option<Finish>,
}

impl HttpBody for Finishing {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.finish = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that says when it has all arrived.
struct Tracked {
    inner: Incoming,
    done: Arc<AtomicBool>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.done.store(true, Ordering::SeqCst);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's I/O, holding its places under the connection caps for as
/// long as the socket lives.
struct Held<I> {
    io: I,
    _slot: Option<ConnSlot>,
    _refusal: Option<RefusalSlot>,
    _forwarded: Arc<Mutex<Option<ConnSlot>>>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Held<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Held<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
