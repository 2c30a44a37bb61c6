//! Stopping a node: the operating system's signals, one notice that every
//! part listens for, and a wait for those parts to finish.
//!
//! [`Shutdown`] is the sending side. Each task that must finish before the
//! process exits holds a [`Listener`]: it learns from it that the node is
//! stopping, and dropping it (the task's end) is what
//! [`Shutdown::finished`] waits for. Nothing polls.

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

/// Tells the listeners that the node is stopping, and waits for them.
#[derive(Debug)]
pub struct Shutdown {
    notice: watch::Sender<bool>,
}

/// One task's side: the notice, and, held until the task ends, its place
/// in what [`Shutdown::finished`] waits for.
#[derive(Debug, Clone)]
pub struct Listener {
    notice: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown {
            notice: watch::Sender::new(false),
        }
    }

    /// A listener for a new task; one made after [`begin`](Self::begin)
    /// hears the notice at once.
    pub fn listener(&self) -> Listener {
        Listener {
            notice: self.notice.subscribe(),
        }
    }

    /// Tells every listener, present and future, that the node is stopping.
    pub fn begin(&self) {
        self.notice.send_replace(true);
    }

    /// Completes once every listener has been dropped.
    pub async fn finished(&self) {
        self.notice.closed().await
    }
}

impl Listener {
    pub fn is_stopping(&self) -> bool {
        *self.notice.borrow()
    }

    /// Completes once the node is stopping (at once if it already is).
    pub async fn stopping(&mut self) {
        // An error means the Shutdown is gone, which also means stopping.
        let _ = self.notice.wait_for(|stopping| *stopping).await;
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C). The handlers are installed when
/// this is called, not when the future is first polled, so a signal sent
/// right after never meets the default action (which ends the process).
pub fn terminate() -> impl Future<Output = ()> + Send + 'static {
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        tokio::select! {
            _ = recv(term) => {},
            _ = recv(int) => {},
        }
        tracing::info!("shutting down");
    }
}

/// A further SIGTERM or SIGINT, to cut a drain short.
pub async fn terminate_again() {
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    tokio::select! {
        _ = recv(term) => {},
        _ = recv(int) => {},
    }
}

/// The next delivery of `s`; never, without a handler.
async fn recv(s: Option<Signal>) {
    match s {
        Some(mut s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn listeners_hear_the_notice_and_finished_waits_for_every_one() {
        let shutdown = Shutdown::new();
        let mut early = shutdown.listener();
        assert!(!early.is_stopping());
        let task = tokio::spawn(async move {
            early.stopping().await;
            // Still working a moment after the notice.
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        shutdown.begin();
        let late = shutdown.listener();
        assert!(late.is_stopping(), "a listener made after begin hears it");
        let finished = tokio::time::timeout(Duration::from_millis(20), shutdown.finished());
        assert!(finished.await.is_err(), "two listeners are still held");
        drop(late);
        tokio::time::timeout(Duration::from_secs(5), shutdown.finished())
            .await
            .expect("finished once the task ended");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn finished_is_immediate_without_listeners() {
        let shutdown = Shutdown::new();
        tokio::time::timeout(Duration::from_millis(100), shutdown.finished())
            .await
            .unwrap();
    }
}
