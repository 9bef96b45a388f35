//! Reporters: consumers of the run's event stream.

pub mod console;
pub mod junit;
pub mod junit_read;
