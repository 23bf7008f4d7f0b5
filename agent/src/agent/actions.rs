//! The agent's OpenWhisk requests: actions put, read, listed and deleted as the
//! functions they are, invocations turned into [`crate::Request::Activate`], records
//! in OpenWhisk's shape. A child of the agent's module: it uses the agent's
//! components as [`Agent::handle`] does.

use ipc::api::ActivationRecord;
use ipc::openwhisk::action::Action;
use ipc::openwhisk::activation::WhiskActivation;
use serde_json::Value;

use super::Agent;
use crate::error::Error;
use crate::names::{from_openwhisk, to_openwhisk, validate_namespace, FunctionKey};
use crate::openwhisk::action::{self as ow, Invocation};
use crate::registry::{not_found, remove_owned_dir, Function};
use crate::request::{FunctionSource, Response};

impl Agent {
    /// sprout's key of the action `name` (OpenWhisk's) of `namespace`.
    fn action_key(namespace: &str, name: &str) -> Result<FunctionKey, Error> {
        validate_namespace(namespace)?;
        FunctionKey::new(namespace, &from_openwhisk(name)?)
    }

    fn action_of(f: &Function) -> Action {
        ow::to_action(
            &f.namespace,
            &to_openwhisk(&f.name),
            &f.info(0),
            f.version,
            f.openwhisk.as_deref(),
        )
    }

    pub(super) fn put_action(
        &self,
        namespace: &str,
        name: &str,
        action: &Action,
        overwrite: bool,
    ) -> Result<Response, Error> {
        let key = Self::action_key(namespace, name)?;
        let _span = tracing::info_span!("put_action", function = %key).entered();
        if !overwrite && self.registry.lookup(&key).is_some() {
            return Err(Error::ActionExists {
                namespace: key.namespace,
                name: name.to_owned(),
            });
        }
        let prepared = ow::prepare(action, &crate::upload::Limits::default())
            .map_err(|e| Error::Action(Box::new(e)))?;
        let (_, old) =
            self.registry
                .register(&key, FunctionSource::Tar(prepared.tar), &prepared.config)?;
        if let Some(old) = old {
            self.invoker.retire(&key);
            remove_owned_dir(&old);
        }
        let f = self.registry.get(&key)?;
        tracing::info!(kind = %prepared.meta.kind, version = f.version, "action put");
        Ok(Response::Action(Box::new(Self::action_of(&f))))
    }

    pub(super) fn get_action(&self, namespace: &str, name: &str) -> Result<Response, Error> {
        let key = Self::action_key(namespace, name)?;
        let f = self.registry.get(&key)?;
        Ok(Response::Action(Box::new(Self::action_of(&f))))
    }

    pub(super) fn list_actions(
        &self,
        namespace: &str,
        limit: u64,
        skip: u64,
    ) -> Result<Response, Error> {
        validate_namespace(namespace)?;
        let mut functions = self.registry.in_namespace(namespace);
        functions.sort_by(|a, b| a.name.cmp(&b.name));
        let limit = match limit {
            0 => ow::MAX_LIST,
            n => n.min(ow::MAX_LIST),
        };
        Ok(Response::Actions(
            functions
                .iter()
                .skip(usize::try_from(skip).unwrap_or(usize::MAX))
                .take(limit as usize)
                .map(|f| {
                    let mut a = Self::action_of(f);
                    // A listing, as OpenWhisk's: no code, no parameters.
                    if let Some(exec) = &mut a.exec {
                        exec.code = None;
                    }
                    a.parameters.clear();
                    a
                })
                .collect(),
        ))
    }

    pub(super) fn delete_action(&self, namespace: &str, name: &str) -> Result<Response, Error> {
        let key = Self::action_key(namespace, name)?;
        let Some(f) = self.registry.remove(&key)? else {
            return Err(not_found(&key));
        };
        self.invoker.retire(&key);
        remove_owned_dir(&f);
        tracing::info!(function = %key, "action deleted");
        Ok(Response::Action(Box::new(Self::action_of(&f))))
    }

    /// The activation an invocation of `namespace/name` (OpenWhisk's name) asks for.
    pub(super) fn action_invocation(
        &self,
        namespace: &str,
        name: &str,
        call: Invocation,
    ) -> Result<crate::openwhisk::Activate, Error> {
        let key = Self::action_key(namespace, name)?;
        let f = self.registry.get(&key)?;
        ow::invocation(&key.namespace, &key.name, f.openwhisk.as_deref(), call)
            .map_err(|e| Error::Action(Box::new(e)))
    }

    /// `record` as OpenWhisk shows it: its action's kind (the function's now, if it
    /// is still registered), OpenWhisk's names; `docs: false` leaves out the result
    /// and the logs.
    pub(super) fn whisk(&self, record: &ActivationRecord, docs: bool) -> WhiskActivation {
        let key = FunctionKey {
            namespace: record.namespace.clone(),
            name: record.name.clone(),
        };
        let kind = match self.registry.lookup(&key) {
            Some(f) => match &f.openwhisk {
                Some(meta) => meta.kind.clone(),
                None => ow::kind_of_runtime(f.runtime.name()).to_owned(),
            },
            None => "unknown".to_owned(),
        };
        let mut a =
            crate::openwhisk::activation::whisk_activation(record, &kind, &record.namespace);
        let full = to_openwhisk(&record.name);
        a.name = full.rsplit('/').next().unwrap_or(&full).to_owned();
        for ann in &mut a.annotations {
            if ann.key == "path" {
                ann.value = Value::String(format!("{}/{full}", record.namespace));
            }
        }
        if !docs {
            a.logs.clear();
            a.response.result = None;
        }
        a
    }
}
