//! Reporters: consumers of the run's event stream.

pub mod cases;
pub mod collect;
pub mod console;
pub mod junit;
pub mod junit_read;
pub mod summary;
