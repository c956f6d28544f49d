//! Counting the AWS requests a process makes, per service and operation:
//! an interceptor on every client, counting each HTTP attempt (retries too).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// Requests made, by `Service.Operation` (`Batch.SubmitJob`, `SQS.ReceiveMessage`).
#[derive(Debug, Clone, Default)]
pub struct RequestCounter(Arc<Mutex<BTreeMap<String, u64>>>);

impl RequestCounter {
    /// The counts so far.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The counts in a line, for logs.
    pub fn summary(&self) -> String {
        let counts = self.snapshot();
        let total: u64 = counts.values().sum();
        let each: Vec<String> = counts.iter().map(|(op, n)| format!("{op}={n}")).collect();
        format!("{total} AWS requests: {}", each.join(" "))
    }
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "evalflow-request-counter"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation =
            cfg.load::<Metadata>().map_or_else(|| "unknown".to_owned(), |m| format!("{}.{}", m.service(), m.name()));
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).entry(operation).or_default() += 1;
        Ok(())
    }
}
