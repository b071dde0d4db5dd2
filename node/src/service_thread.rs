//! The cloud- and secret-chat services each own their state on a thread of
//! their own, driven by a single-threaded runtime. What they ask of peers
//! runs on the node's main runtime instead: spawned on the service's own
//! runtime, a request would only move while the service loop waits, which
//! under load is seldom (answers came back hundreds of milliseconds late).

use std::future::Future;

use tokio::{runtime::Handle, sync::oneshot, task::JoinHandle};
use tracing::warn;

/// Starts `run` on a thread named `name` with a runtime of its own; the
/// returned task finishes when `run`'s future does.
pub fn start<F, Fut>(name: &str, run: F) -> JoinHandle<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (done_tx, done_rx) = oneshot::channel();
    let thread = name.to_owned();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(run()),
                Err(e) => warn!("cannot start the runtime of {thread}: {e}"),
            }
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        warn!("cannot start the thread {name}: {e}");
    }
    tokio::spawn(async move {
        let _ = done_rx.await;
    })
}

/// Where a service's requests to peers run: the runtime that started the
/// service (the node's), or the current one when there was none.
#[derive(Clone, Default)]
pub struct MainRuntime(Option<Handle>);

impl MainRuntime {
    pub fn current() -> Self {
        Self(Handle::try_current().ok())
    }

    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match &self.0 {
            Some(handle) => drop(handle.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        time::{Duration, Instant},
    };

    use super::*;

    /// A service loop that never waits (as under a stream of work) still
    /// gets what it asked of peers: the request runs on the main runtime.
    /// Spawned on the service's own runtime, it would not run until the
    /// loop waited.
    #[test]
    fn a_request_moves_while_the_service_loop_is_busy() {
        let main = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let answered = Arc::new(AtomicBool::new(false));
        let seen = answered.clone();
        let service = {
            let _inside = main.enter();
            let io = MainRuntime::current();
            start("tern-test", move || async move {
                let flag = answered.clone();
                io.spawn(async move { flag.store(true, Ordering::SeqCst) });
                // Busy: no await until the request is answered (or a
                // generous deadline passes).
                let deadline = Instant::now() + Duration::from_secs(30);
                while !answered.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::yield_now();
                }
            })
        };
        main.block_on(service).unwrap();
        assert!(
            seen.load(Ordering::SeqCst),
            "the request did not run while the service loop was busy"
        );
    }
}
