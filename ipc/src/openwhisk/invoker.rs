//! The invoker contract: the controller's `ActivationMessage` (`POST /invoke`'s body)
//! and the acknowledgement written back (the combined completion and result).
