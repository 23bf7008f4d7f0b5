//! An action as OpenWhisk's REST API writes and reads it (`PUT`/`GET
//! /api/v1/namespaces/{ns}/actions/{name}`).
