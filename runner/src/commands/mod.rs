//! One module per subcommand; each returns the process exit code.

pub mod doctor;
pub mod images;
pub mod matrix;
pub mod serve;
pub mod test;
