//! One module per subcommand.

pub mod bench;
pub mod forward;
pub mod info;
