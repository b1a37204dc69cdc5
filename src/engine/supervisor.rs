//! The supervisor: the run loop that owns every engine's life.
//!
//! One engine per cycle; the loop alone stops engines. Failed starts retry under an
//! exponential backoff (1 s, ×1.7, at most 15 s, jittered) that a cancel interrupts at once;
//! a permanent failure (needs login, rejected setup key, a listener that cannot bind) ends the
//! loop with that error. `stop` cancels the run token and waits for the loop, or returns at once
//! when the loop never ran.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Ready;
use super::netbird::{Engine, EngineError, MeshConfig};

/// Called each time an engine is up.
pub type OnReady = Arc<dyn Fn(&Ready) + Send + Sync>;

/// Owns the run loop.
pub struct Supervisor {
    run: CancellationToken,
    handle: Mutex<Option<JoinHandle<Result<(), EngineError>>>>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    /// A supervisor whose run token exists from the start, so `stop` is always safe.
    pub fn new() -> Self {
        Self {
            run: CancellationToken::new(),
            handle: Mutex::new(None),
        }
    }

    /// Start the run loop (once; later calls do nothing).
    pub async fn spawn(&self, config: MeshConfig, on_ready: OnReady) {
        let mut handle = self.handle.lock().await;
        if handle.is_none() && !self.run.is_cancelled() {
            *handle = Some(tokio::spawn(run_loop(config, self.run.clone(), on_ready)));
        }
    }

    /// Wait for the run loop to end by itself (a permanent error) or by `stop`. A wait that
    /// is dropped (a `select!` that took another branch) leaves the loop's handle for the
    /// next one, so a later `stop` still waits for the loop to finish.
    pub async fn wait(&self) -> Result<(), EngineError> {
        let mut handle = self.handle.lock().await;
        let result = match handle.as_mut() {
            Some(h) => h.await.unwrap_or(Err(EngineError::Cancelled)),
            None => return Ok(()),
        };
        *handle = None;
        result
    }

    /// Cancel the run and wait for the loop (and so its engine) to finish.
    pub async fn stop(&self) -> Result<(), EngineError> {
        self.run.cancel();
        self.wait().await
    }
}

/// Engine retries: 1 s, ×1.7, at most 15 s, jittered.
pub(crate) fn backoff() -> impl Iterator<Item = Duration> {
    crate::control::backoff(Duration::from_secs(1), Duration::from_secs(15))
}

async fn run_loop(
    config: MeshConfig,
    run: CancellationToken,
    on_ready: OnReady,
) -> Result<(), EngineError> {
    let mut delays = backoff();
    let mut first = true;
    loop {
        if run.is_cancelled() {
            return Ok(());
        }
        if !std::mem::take(&mut first)
            && let Some(hub) = &config.proxy.status
        {
            hub.count_restart();
        }
        let cycle = run.child_token();
        let engine = Engine::new(config.clone(), &cycle);
        let started = engine.start(|ready| on_ready(ready)).await;
        match started {
            Ok(()) => {
                delays = backoff();
                cycle.cancelled().await;
                engine.stop().await;
                if run.is_cancelled() {
                    return Ok(());
                }
                info!("rebuilding the engine");
            }
            Err(EngineError::Cancelled) if run.is_cancelled() => return Ok(()),
            Err(e) if e.is_permanent() => {
                engine.stop().await;
                // Ends the run without awaiting ourselves.
                run.cancel();
                return Err(e);
            }
            Err(e) => {
                engine.stop().await;
                warn!("engine start failed: {e}");
            }
        }
        // Between cycles, even after a good one, so a subsystem failing at once cannot spin.
        let delay = delays.next().unwrap_or(Duration::from_secs(15));
        info!("next attempt in {:.1} s", delay.as_secs_f32());
        tokio::select! {
            _ = run.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
