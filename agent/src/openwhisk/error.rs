//! What is wrong with an OpenWhisk activation a client sent (a leaf: the agent's
//! `Error` wraps it).

/// A bad [`Activate`]: refused (`400`) before anything runs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the parameters are {found}: an OpenWhisk activation takes a JSON object or array")]
    Params { found: &'static str },
    #[error("init parameter {name:?}: {why}")]
    InitEnv { name: String, why: &'static str },
    #[error("{field} is {len} bytes, longer than {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} holds a control character")]
    Control { field: &'static str },
    #[error("the activation's environment is {len} bytes as JSON, more than {max}")]
    EnvTooLarge { len: usize, max: usize },
    #[error("the activation's init parameters are {count}, more than {max}")]
    TooManyInitParams { count: usize, max: usize },
}
