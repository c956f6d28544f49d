//! `evalflow plan`: the workload file read, the running times observed in a
//! data directory if asked, the plan made and printed.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use evalflow_worker::api::operations::Durations;
use evalflow_workflow::plan::{Workload, WorkloadConfig, plan};

use crate::backend::connect;
use crate::output;

/// Reads `workload`, draws its running times from `from`'s runs if given,
/// plans it for `deadline_hours` if given, and prints the plan.
pub async fn run(workload: &Path, from: Option<&Path>, deadline_hours: Option<f64>, json: bool) -> Result<ExitCode> {
    let text = std::fs::read_to_string(workload).with_context(|| format!("cannot read {}", workload.display()))?;
    let mut config = WorkloadConfig::from_toml(&text).with_context(|| format!("in {}", workload.display()))?;
    if let Some(deadline) = deadline_hours {
        config.fleet.instances = None;
        config.fleet.deadline_hours = Some(deadline);
    }
    let observed = match from {
        Some(dir) => {
            let backend = connect(dir).await?;
            let durations = backend.call(Durations {}).await;
            backend.close().await?;
            let durations = durations?;
            if !json {
                eprintln!(
                    "running times: from the {} runs whose job succeeded, of {} in {}",
                    durations.reference_secs.len(),
                    durations.runs,
                    dir.display()
                );
            }
            Some(durations.reference_secs)
        }
        None => None,
    };
    let workload = Workload::new(config, observed).with_context(|| format!("in {}", workload.display()))?;
    let plan = tokio::task::spawn_blocking(move || plan(&workload)).await.context("the planner stopped")??;
    if json {
        output::json(&plan)?;
    } else {
        output::plan(&plan);
    }
    Ok(ExitCode::SUCCESS)
}
