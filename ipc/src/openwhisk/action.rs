//! An action as OpenWhisk's REST API writes and reads it (`PUT`/`GET
//! /api/v1/namespaces/{ns}/actions/{name}`), and as OpenWhisk's `whisks` database
//! holds it (an invoker fetching an action it does not have).

use serde::{Deserialize, Serialize};

use super::KeyValue;

/// An action: `PUT`'s body (every field optional there), `GET`'s answer.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Action {
    /// Its namespace (`GET` only; ignored in a `PUT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Its OpenWhisk name (`GET` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Exec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// Default parameters, merged under each invocation's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<KeyValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub annotations: Vec<KeyValue>,
    /// `0.0.N` (`GET` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default)]
    pub publish: bool,
}

/// `exec`: what runs.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Exec {
    /// `python:3`, `python:default`, `nodejs:20`, `nodejs:default`, `blackbox`.
    pub kind: String,
    /// Source text, or base64 of a zip when `binary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default)]
    pub binary: bool,
    /// The entry point (default `main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main: Option<String>,
    /// A container image: refused (sprout runs no images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// `limits`, OpenWhisk's units.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// MB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// MB of logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u64>,
}
