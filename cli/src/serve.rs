//! `evalflow serve`: the engine, its workers and its HTTP API, until Ctrl-C
//! or SIGTERM. Running jobs go on after it stops; the next engine follows them.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use evalflow_activities::local::sandbox::Isolation;
use evalflow_worker::api;
use evalflow_worker::api::token::ApiToken;
use evalflow_worker::config::Config;
use evalflow_worker::datadir::lock::{EngineInfo, LockState, lock_for_engine};
use evalflow_worker::node::{Mode, Node, NodeOptions};
use tokio_util::sync::CancellationToken;

use crate::backend::{LOCK_WAIT, supervisor};
use crate::signals;

/// Serves `data_dir` on `listen`.
pub async fn run(data_dir: &Path, listen: SocketAddr, isolation: Isolation) -> Result<ExitCode> {
    if !listen.ip().is_loopback() {
        bail!(
            "--listen {listen}: the API is for this machine's operator, so it listens on loopback only (127.0.0.1 or ::1)"
        );
    }
    let mut lock =
        match lock_for_engine(data_dir, LOCK_WAIT).with_context(|| format!("cannot lock {}", data_dir.display()))? {
            LockState::Acquired(lock) => lock,
            LockState::HeldBy(Some(info)) => bail!(
                "{} is already served by an engine (pid {}) at {}: use that one, or stop it first",
                data_dir.display(),
                info.pid,
                info.api
            ),
            LockState::HeldBy(None) => bail!(
                "{} is in use by another evalflow command that did not finish in {} s",
                data_dir.display(),
                LOCK_WAIT.as_secs()
            ),
        };
    let config = Config::load(data_dir)?;
    // Made before the engine announces itself: a client that finds the
    // announcement finds the token.
    let token = ApiToken::load_or_create(&config.data_dir)?;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
            "cannot listen on {listen}: another process uses that address; choose another with \
             --listen 127.0.0.1:PORT, or --listen 127.0.0.1:0 for any free port"
        ),
        _ => anyhow::anyhow!("cannot listen on {listen}: {e}"),
    })?;
    let info = EngineInfo { pid: std::process::id(), api: format!("http://{}", listener.local_addr()?) };
    lock.announce(&info)?;
    let options = NodeOptions { isolation, supervisor: supervisor()?, mode: Mode::Engine, runner: None };
    let node = Arc::new(Node::start(config, lock, options).await?);
    println!("evalflow engine (pid {}) serving {} at {}", info.pid, data_dir.display(), info.api);
    println!("dashboard: `evalflow --data-dir {} dashboard` prints its address", data_dir.display());
    let shutdown = CancellationToken::new();
    let watchdog = tokio::spawn(stop_on_signal_or_failure(node.clone(), shutdown.clone()));
    api::serve(node.clone(), token, listener, shutdown).await?;
    // Waited for, not only aborted: the task may still hold the node (it
    // drops it only after cancelling `shutdown`, which ends `serve` at once).
    watchdog.abort();
    let _ = watchdog.await;
    let failed = node.stopped();
    if let Some(requests) = node.requests() {
        eprintln!("{}", requests.summary());
    }
    match Arc::try_unwrap(node) {
        Ok(node) => node.shutdown().await?,
        Err(_) => bail!("the API kept the engine busy at shutdown"),
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

async fn stop_on_signal_or_failure(node: Arc<Node>, shutdown: CancellationToken) {
    tokio::select! {
        _ = signals::shutdown() => eprintln!("stopping: running jobs go on, and the next engine follows them"),
        _ = async {
            while !node.stopped() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        } => eprintln!("error: the engine stopped"),
    }
    shutdown.cancel();
}
