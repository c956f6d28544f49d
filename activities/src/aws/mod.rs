//! AWS: Batch runs the jobs ([`batch::BatchRunner`]), S3 keeps predictions,
//! labels, results and leaderboards ([`s3::S3Artifacts`]).
//!
//! Clients retry throttling (HTTP 429), server errors and network trouble
//! themselves, with exponential backoff and jitter (the SDK's standard retry
//! mode, [`SDK_ATTEMPTS_MAX`] attempts); what still fails becomes an
//! [`ActivityError`] that says whether a later retry may succeed.

pub mod batch;
pub mod bootstrap;
pub mod classify;
pub mod logs;
pub mod outputs;
pub mod requests;
pub mod s3;

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_types::error::display::DisplayErrorContext;

use self::requests::RequestCounter;

use crate::ActivityError;

/// Attempts per AWS request, retries included.
pub const SDK_ATTEMPTS_MAX: u32 = 8;

/// Where the AWS API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The region.
    pub region: String,
    /// Another implementation of the API (such as moto on loopback), if not AWS itself.
    pub url: Option<String>,
}

/// The SDK configuration for `endpoint`, with credentials from the standard chain.
pub async fn sdk_config(endpoint: &Endpoint) -> SdkConfig {
    let retry = RetryConfig::standard()
        .with_max_attempts(SDK_ATTEMPTS_MAX)
        .with_initial_backoff(Duration::from_millis(200))
        .with_max_backoff(Duration::from_secs(20));
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(endpoint.region.clone()))
        .retry_config(retry);
    if let Some(url) = &endpoint.url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// An AWS Batch client, counting its requests in `requests`.
pub fn batch_client(sdk: &SdkConfig, requests: &RequestCounter) -> aws_sdk_batch::Client {
    let config = aws_sdk_batch::config::Builder::from(sdk).interceptor(requests.clone()).build();
    aws_sdk_batch::Client::from_conf(config)
}

/// An S3 client, counting its requests: path-style addressing, which works with any endpoint.
pub fn s3_client(sdk: &SdkConfig, requests: &RequestCounter) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::from(sdk).force_path_style(true).interceptor(requests.clone()).build();
    aws_sdk_s3::Client::from_conf(config)
}

/// The error code AWS gave, if any.
pub fn error_code<E: ProvideErrorMetadata>(error: &SdkError<E, HttpResponse>) -> Option<&str> {
    match error {
        SdkError::ServiceError(service) => service.err().code(),
        _ => None,
    }
}

/// The HTTP status of a service error.
pub fn error_status<E>(error: &SdkError<E, HttpResponse>) -> Option<u16> {
    match error {
        SdkError::ServiceError(service) => Some(service.raw().status().as_u16()),
        _ => None,
    }
}

/// An SDK error as an activity error: network trouble, throttling and
/// server errors may pass; anything else (a missing bucket, a bad parameter)
/// needs the operator.
pub fn activity_error<E>(what: &str, error: SdkError<E, HttpResponse>) -> ActivityError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transient = match &error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        SdkError::ServiceError(_) => {
            let throttled = matches!(
                error_code(&error),
                Some("TooManyRequestsException" | "ThrottlingException" | "SlowDown" | "RequestLimitExceeded")
            );
            throttled || error_status(&error).is_some_and(|s| s == 429 || s >= 500)
        }
        _ => false,
    };
    let message = format!("{what}: {}", describe(&error));
    if transient { ActivityError::Transient(message) } else { ActivityError::Permanent(message) }
}

/// An SDK error in a line: the service's code and message when it answered,
/// the whole chain of causes when it could not be reached.
pub fn describe<E, R>(error: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match error {
        SdkError::ServiceError(service) => {
            let meta = service.err();
            match (meta.code(), meta.message()) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code.to_owned(),
                _ => DisplayErrorContext(error).to_string(),
            }
        }
        other => DisplayErrorContext(other).to_string(),
    }
}
