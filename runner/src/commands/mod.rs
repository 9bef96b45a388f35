//! One module per subcommand; each returns the process exit code.

pub mod doctor;
pub mod images;
pub mod serve;
pub mod test;
