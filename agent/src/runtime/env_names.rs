//! The environment variables a function's configuration may not set: sprout's own,
//! and those the runtimes' protocols define. A leaf: OpenWhisk's actions and
//! `ol.yaml` both check against it.

/// Name prefixes (and names) an `environment` may not set: sprout's own variables,
/// and those the runtimes' protocols define for a function (OpenWhisk's activation
/// context, AWS Lambda's runtime API), which must say what sprout says.
pub const RESERVED_ENV: &[&str] = &[
    "SPROUT_",
    "__OW_",
    "AWS_LAMBDA_",
    "_HANDLER",
    "LAMBDA_TASK_ROOT",
];

/// The [`RESERVED_ENV`] entry `name` falls under, if any.
pub fn reserved_env(name: &str) -> Option<&'static str> {
    RESERVED_ENV
        .iter()
        .copied()
        .find(|r| name.starts_with(r) && (r.ends_with('_') || name == *r))
}
