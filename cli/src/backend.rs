//! Where a CLI command acts: through the API of the engine that holds the
//! data directory, or, when none does, on the store itself (a direct node).

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use evalflow_activities::local::sandbox::Isolation;
use evalflow_worker::api::ErrorBody;
use evalflow_worker::api::operations::{Method, Operation, Ping};
use evalflow_worker::api::token::ApiToken;
use evalflow_worker::config::Config;
use evalflow_worker::datadir::lock::{EngineInfo, LockState, try_lock};
use evalflow_worker::node::{Mode, Node, NodeOptions};

/// How long an engine waits for a CLI command holding the data directory.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// How long the CLI waits for an engine's answer.
const API_TIMEOUT: Duration = Duration::from_secs(60);

/// The supervisor command: this very binary's hidden `supervise`.
pub fn supervisor() -> Result<Vec<OsString>> {
    let exe = std::env::current_exe().context("cannot find the evalflow binary")?;
    Ok(vec![exe.into(), "supervise".into()])
}

/// An engine's API.
pub struct Client {
    http: reqwest::Client,
    info: EngineInfo,
    token: ApiToken,
}

impl Client {
    /// Does `operation` through the engine's API.
    async fn call<O: Operation>(&self, operation: &O) -> Result<O::Answer> {
        let request = match O::METHOD {
            Method::Get => self.http.get(format!("{}{}", self.info.api, operation.target()?)),
            Method::Post => self.http.post(format!("{}{}", self.info.api, O::ROUTE)).json(operation),
        };
        let unreachable =
            |e: reqwest::Error| anyhow!("the engine (pid {}) does not answer at {}: {e}", self.info.pid, self.info.api);
        let response = request.bearer_auth(self.token.as_str()).send().await.map_err(unreachable)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let body: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
            bail!("{}", body.map_or_else(|| format!("the engine answered {status}"), |b| b.error));
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("unexpected answer from the engine at {}", self.info.api))
    }
}

/// Where commands go.
pub enum Backend {
    /// A running engine, through its API.
    Engine(Client),
    /// The store, through a direct node holding the data directory's lock.
    Direct(Box<Node>),
}

/// Connects to the engine of `data_dir`, or opens its store when none runs.
/// A lock held by a process that has not said how to reach it (an engine
/// starting, another command) is waited for, up to [`LOCK_WAIT`].
pub async fn connect(data_dir: &Path) -> Result<Backend> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let lock = loop {
        match try_lock(data_dir).with_context(|| format!("cannot lock {}", data_dir.display()))? {
            LockState::Acquired(lock) => break lock,
            LockState::HeldBy(Some(info)) => return Ok(Backend::Engine(reach(data_dir, info).await?)),
            LockState::HeldBy(None) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            LockState::HeldBy(None) => bail!(
                "{} is locked by another evalflow process that has not said how to reach it for {} s: \
                 wait for it to finish, or stop it",
                data_dir.display(),
                LOCK_WAIT.as_secs()
            ),
        }
    };
    let config = Config::load(data_dir)?;
    let options =
        NodeOptions { isolation: Isolation::Sandbox, supervisor: supervisor()?, mode: Mode::Direct, runner: None };
    Ok(Backend::Direct(Box::new(Node::start(config, lock, options).await?)))
}

/// The engine `info` announces, once it answers. Its token is read from
/// `data_dir`: a user who may not read it is told so; a missing one means the
/// process holding the lock is not an engine that answers.
async fn reach(data_dir: &Path, info: EngineInfo) -> Result<Client> {
    let unanswered = |e: anyhow::Error| {
        e.context(format!(
            "{} is locked by an evalflow engine (pid {}) that does not answer at {}: \
             wait for it, or stop it (kill {}) and try again",
            data_dir.display(),
            info.pid,
            info.api,
            info.pid
        ))
    };
    let token = match ApiToken::read(data_dir) {
        Err(e) if e.is_permission_denied() => return Err(e.into()),
        token => token.map_err(|e| unanswered(e.into()))?,
    };
    let http = reqwest::Client::builder().timeout(API_TIMEOUT).build()?;
    let client = Client { http, info: info.clone(), token };
    client.call(&Ping {}).await.map_err(unanswered)?;
    Ok(client)
}

impl Backend {
    /// Closes the backend: a direct node applies what it owes and stops.
    pub async fn close(self) -> Result<()> {
        match self {
            Backend::Engine(_) => Ok(()),
            Backend::Direct(node) => Ok(node.shutdown().await?),
        }
    }

    /// Does `operation`: through the engine's API, or on the store.
    pub async fn call<O: Operation>(&self, operation: O) -> Result<O::Answer> {
        match self {
            Backend::Engine(c) => c.call(&operation).await,
            Backend::Direct(n) => Ok(operation.run(n).await?),
        }
    }
}
